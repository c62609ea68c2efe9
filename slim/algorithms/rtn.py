from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


class RoundToNearest:
    """``rtn``: quantize the weights as they are (the scheme's observer picks the scales)."""

    name = "rtn"

    def __init__(self, ctx=None):
        self.ctx = ctx

    def prepare(self, ctx) -> set[str]:
        """Nothing to change before observing."""
        return set()

    @contextlib.contextmanager
    def collect(self, targets: dict[str, nn.Linear]) -> Iterator[None]:
        yield

    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun=None, wanted=None) -> dict:
        """Nothing to decide: every target is quantized by round to nearest."""
        return {}
