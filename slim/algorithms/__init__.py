"""Per-layer algorithms: the step of the layer loop between observing a layer and quantizing it.

An algorithm may gather what it needs while the layer's calibration inputs run through it (``collect``) and then
change the values of the target Linears' weights before they are quantized (``apply``): it never changes which
tensors are written or how, so every checkpoint format keeps working. ``rtn`` (round to nearest, the default)
does nothing: the weights are quantized as they are.

    ALGORITHMS[name]() -> LayerAlgorithm          one entry per algorithm, one module each (slim/algorithms/*.py)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Protocol

from torch import nn

from slim.algorithms.rtn import RoundToNearest


class LayerAlgorithm(Protocol):
    """One layer at a time: ``collect`` wraps the layer's calibration forward pass, ``apply`` runs after the
    observers were merged across ranks and before the targets are quantized."""

    name: str

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager: ...

    def apply(self, targets: dict[str, nn.Linear], observers: dict) -> dict[str, dict]: ...


ALGORITHMS: dict[str, Callable[[], LayerAlgorithm]] = {"rtn": RoundToNearest}
