"""Per-layer algorithms: the step of the layer loop between observing a layer and quantizing it.

An algorithm may gather what it needs while the layer's calibration inputs run through it (``collect``) and then
decide the target Linears' codes and scales before they are written (``apply`` returns them per target, as
:class:`slim.algorithms.gptq.Solved`; a target it returns nothing for, or no codes, is quantized by round to
nearest): it never changes which tensors are written or how, so every checkpoint format keeps working. ``rtn``
(round to nearest, the default) does nothing: the weights are quantized as they are. ``gptq``: GPTQ.

    ALGORITHMS[name](ctx: AlgorithmContext) -> LayerAlgorithm   one entry per algorithm, one module each
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from slim.algorithms.gptq import GPTQ, Solved
from slim.algorithms.rtn import RoundToNearest


@dataclass(frozen=True)
class AlgorithmContext:
    """What an algorithm needs beyond its config: the scheme's weight numerics (the scale rule and the dtype the
    format stores group scales in), the ranks, and the plan's expert chunk (routed experts per calibration pass)."""

    cfg: Any = None  # slim.config.AlgorithmConfig
    scheme: Any = None  # slim.quant.schemes.Scheme
    group_size: int | None = None
    weight_observer: str = "minmax"
    scale_dtype: torch.dtype | None = None
    dist: Any = None  # slim.distributed.Dist
    expert_chunk: int = 0  # 0: all routed experts of a layer in one pass


class LayerAlgorithm(Protocol):
    """One layer at a time: ``collect`` wraps the layer's calibration forward pass, ``apply`` runs after the
    observers were merged across ranks and before the targets are quantized."""

    name: str

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager: ...

    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun: Callable[[], object] | None = None,
              wanted: set[str] | None = None) -> dict[str, Solved]:
        """``rerun``: the layer's calibration forward pass again (for algorithms that collect in several passes);
        ``wanted``: the targets whose results this rank writes (None: all)."""
        ...


ALGORITHMS: dict[str, Callable[..., LayerAlgorithm]] = {"rtn": RoundToNearest, "gptq": GPTQ}
"""``rtn``: round to nearest, the default algorithm; ``gptq``: GPTQ (slim.algorithms.gptq)."""


def build_algorithm(cfg, scheme, fmt, dist=None, expert_chunk: int = 0) -> LayerAlgorithm:
    """The configured algorithm for one run (``cfg``: the full SlimConfig)."""
    ctx = AlgorithmContext(cfg=cfg.algorithm, scheme=scheme, group_size=cfg.scheme.group_size,
                           weight_observer=cfg.scheme.weight_observer,
                           scale_dtype=getattr(fmt, "group_scale_dtype", None), dist=dist, expert_chunk=expert_chunk)
    return ALGORITHMS[cfg.algorithm.name](ctx)
