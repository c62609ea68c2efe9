"""Per-layer algorithms: the steps of the layer loop around observing a layer and quantizing it.

An algorithm may change the layer before it is observed (``prepare``: AWQ smooths it, so the static FP8 input
scales the observe step then measures are those of the smoothed layer), gather what it needs while the layer's
calibration inputs run through it (``collect``) and change the values of the target Linears' weights before they
are quantized (``apply``). It never changes which tensors are written or how, so every checkpoint format keeps
working; tensors that ``prepare`` changed are written from their new values (``LayerQuantizer.write_rest``).
``rtn`` (round to nearest, the default) does nothing: the weights are quantized as they are.

    ALGORITHMS[name]() -> LayerAlgorithm          one entry per algorithm, one module each (slim/algorithms/*.py)
    Composed(name, first, second)                 ``prepare`` of ``first``, ``collect``/``apply`` of ``second``
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from slim.algorithms.awq import AWQ
from slim.algorithms.rtn import RoundToNearest
from slim.errors import SlimError
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


class LayerAlgorithm(Protocol):
    """One layer at a time: ``prepare`` runs after the layer is materialized and before it is observed, and returns
    the full names of the tensors whose values it changed; ``collect`` wraps the layer's calibration forward pass;
    ``apply`` runs after the observers were merged across ranks and before the targets are quantized."""

    name: str

    def prepare(self, ctx: LayerContext) -> set[str]: ...

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager: ...

    def apply(self, targets: dict[str, nn.Linear], observers: dict) -> dict[str, dict]: ...


class Composed:
    """Two algorithms in one layer step: ``first`` prepares the layer (e.g. AWQ smooths it), ``second`` collects and
    changes the weights (e.g. GPTQ). Both factories get the same arguments."""

    def __init__(self, name: str, first: Callable[..., LayerAlgorithm], second: Callable[..., LayerAlgorithm],
                 *args, **kwargs):
        self.name = name
        self.first, self.second = first(*args, **kwargs), second(*args, **kwargs)

    def prepare(self, ctx: LayerContext) -> set[str]:
        return self.first.prepare(ctx)

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager:
        return self.second.collect(targets)

    def apply(self, targets: dict[str, nn.Linear], observers: dict) -> Any:
        return self.second.apply(targets, observers)


def _awq_gptq(*args, **kwargs) -> Composed:
    """AWQ's smoothing, then GPTQ's weights; GPTQ is looked up when the algorithm is built."""
    if "gptq" not in ALGORITHMS:
        raise SlimError("algorithm=awq_gptq needs GPTQ (slim/algorithms/gptq.py), which this slim does not have; "
                        "choose algorithm=awq")
    return Composed("awq_gptq", ALGORITHMS["awq"], ALGORITHMS["gptq"], *args, **kwargs)


ALGORITHMS: dict[str, Callable[..., LayerAlgorithm]] = {"rtn": RoundToNearest, "awq": AWQ, "awq_gptq": _awq_gptq}
"""``rtn``: round to nearest, the default; ``awq``: activation-aware smoothing (slim.algorithms.awq), then RTN;
``awq_gptq``: AWQ's smoothing, then GPTQ (where slim.algorithms.gptq registers ``gptq``)."""
