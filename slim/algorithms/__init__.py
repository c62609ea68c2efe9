"""Per-layer algorithms: the steps of the layer loop around observing a layer and quantizing it.

An algorithm may change the layer before it is observed (``prepare``: AWQ smooths it, so the static FP8 input
scales the observe step then measures are those of the smoothed layer), gather what it needs while the layer's
calibration inputs run through it (``collect``) and decide the target Linears' codes and scales before they are
written (``apply`` returns them per target, as :class:`slim.algorithms.gptq.Solved`; a target it returns nothing
for, or no codes, is quantized by round to nearest). It never changes which tensors are written or how, so every
checkpoint format keeps working; tensors that ``prepare`` changed are written from their new values
(``LayerQuantizer.write_rest``). ``rtn`` (round to nearest, the default) does nothing: the weights are quantized as
they are.

    ALGORITHMS[name](ctx: AlgorithmContext) -> LayerAlgorithm   one entry per algorithm, one module each
    Composed(name, first, second, ctx)        ``prepare`` of ``first``, ``collect``/``apply`` of ``second``
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from slim.algorithms.awq import AWQ
from slim.algorithms.gptq import GPTQ, Solved
from slim.algorithms.rtn import RoundToNearest
from slim.quant.schemes import Scheme


@dataclass
class LayerContext:
    """What ``prepare`` may use for one decoder layer (materialized, not yet observed).

    ``run(samples)`` runs this rank's calibration samples (a slice of them, in this rank's order: rank ``r`` of
    ``w`` holds global samples ``r, r + w, ...``; default all) through the layer in its batches and returns the
    layer's outputs: forward hooks the algorithm registers see them, and routed experts see the tokens
    ``calibration.route_all_experts`` gives them. ``targets``: the layer's Linears that will be quantized, by full
    name. ``settings``: the
    ``algorithm`` config group (typed, :class:`slim.config.AlgorithmConfig`)."""

    layer: nn.Module
    prefix: str  # "model.layers.3."
    targets: dict[str, nn.Linear]
    run: Callable[..., list[torch.Tensor]]
    scheme: Scheme
    group_size: int | None
    weight_observer: str
    group_scale_dtype: torch.dtype | None  # what the format stores int4 group scales in (None: fp32)
    dist: Any  # slim.distributed.Dist (not imported: slim.distributed imports slim.config, which imports this)
    adapter_name: str  # slim.models.adapters.ModelAdapter.name
    settings: Any
    store_device: torch.device  # where cached activations wait (the calibration hidden states' device)


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
    """One layer at a time: ``prepare`` runs after the layer is materialized and before it is observed, and returns
    the full names of the tensors whose values it changed; ``collect`` wraps the layer's calibration forward pass;
    ``apply`` runs after the observers were merged across ranks and before the targets are quantized."""

    name: str

    def prepare(self, ctx: LayerContext) -> set[str]: ...

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager: ...

    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun: Callable[[], object] | None = None,
              wanted: set[str] | None = None) -> dict[str, Solved]:
        """``rerun``: the layer's calibration forward pass again (for algorithms that collect in several passes);
        ``wanted``: the targets whose results this rank writes (None: all)."""
        ...


class Composed:
    """Two algorithms in one layer step: ``first`` prepares the layer (e.g. AWQ smooths it), ``second`` collects and
    decides the codes (e.g. GPTQ). Both factories get the same arguments."""

    def __init__(self, name: str, first: Callable[..., LayerAlgorithm], second: Callable[..., LayerAlgorithm],
                 *args, **kwargs):
        self.name = name
        self.first, self.second = first(*args, **kwargs), second(*args, **kwargs)

    def prepare(self, ctx: LayerContext) -> set[str]:
        return self.first.prepare(ctx)

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager:
        return self.second.collect(targets)

    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun: Callable[[], object] | None = None,
              wanted: set[str] | None = None) -> dict[str, Solved]:
        """``second``'s results; what ``first`` says of a target (its ``reason``, e.g. AWQ's search result) is kept
        in the target's note, and a target ``second`` left alone keeps ``first``'s entry."""
        said = self.first.apply(targets, observers, rerun=None, wanted=wanted)
        out = self.second.apply(targets, observers, rerun=rerun, wanted=wanted)
        for name, first in said.items():
            if name not in out:
                out[name] = first
            elif first.reason:
                out[name].reason = "; ".join(r for r in (first.reason, out[name].reason) if r)
        return out


def _awq_gptq(*args, **kwargs) -> Composed:
    """AWQ's smoothing, then GPTQ's codes."""
    return Composed("awq_gptq", AWQ, GPTQ, *args, **kwargs)


ALGORITHMS: dict[str, Callable[..., LayerAlgorithm]] = {"rtn": RoundToNearest, "gptq": GPTQ, "awq": AWQ,
                                                        "awq_gptq": _awq_gptq}
"""``rtn``: round to nearest, the default; ``gptq``: GPTQ (slim.algorithms.gptq); ``awq``: activation-aware
smoothing (slim.algorithms.awq), then RTN; ``awq_gptq``: AWQ's smoothing, then GPTQ."""


def build_algorithm(cfg, scheme, fmt, dist=None, expert_chunk: int = 0) -> LayerAlgorithm:
    """The configured algorithm for one run (``cfg``: the full SlimConfig)."""
    ctx = AlgorithmContext(cfg=cfg.algorithm, scheme=scheme, group_size=cfg.scheme.group_size,
                           weight_observer=cfg.scheme.weight_observer,
                           scale_dtype=getattr(fmt, "group_scale_dtype", None), dist=dist, expert_chunk=expert_chunk)
    return ALGORITHMS[cfg.algorithm.name](ctx)
