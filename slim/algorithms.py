"""Per-layer algorithms: the step of the layer loop between observing a layer and quantizing it.

An algorithm may gather what it needs while the layer's calibration inputs run through it (``collect``) and then
change the values of the target Linears' weights before they are quantized (``apply``): it never changes which
tensors are written or how, so every checkpoint format keeps working. ``rtn`` (round to nearest, the default)
does nothing: the weights are quantized as they are.

    ALGORITHMS[name]() -> LayerAlgorithm          one entry per algorithm
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol

from torch import nn


class LayerAlgorithm(Protocol):
    """One layer at a time: ``collect`` wraps the layer's calibration forward pass, ``apply`` runs after the
    observers were merged across ranks and before the targets are quantized."""

    name: str

    def collect(self, targets: dict[str, nn.Linear]) -> contextlib.AbstractContextManager: ...

    def apply(self, targets: dict[str, nn.Linear], observers: dict) -> dict[str, dict]: ...


class RoundToNearest:
    """``rtn``: quantize the weights as they are (the scheme's observer picks the scales)."""

    name = "rtn"

    @contextlib.contextmanager
    def collect(self, targets: dict[str, nn.Linear]) -> Iterator[None]:
        yield

    def apply(self, targets: dict[str, nn.Linear], observers: dict) -> dict[str, dict]:
        """Nothing to change; returns per-module notes for the records (none)."""
        return {}


ALGORITHMS: dict[str, Callable[[], LayerAlgorithm]] = {"rtn": RoundToNearest}
