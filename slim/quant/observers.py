"""Observers: statistics gathered from tensors that decide quantization scales. One registry entry each.

Activation observers see calibration inputs batch by batch (``update``) and can be merged across ranks by
MAX, which is order-independent: a distributed run gives the same scales as a single process.
Weight observers return the absolute maximum to quantize against, per tensor or per group.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


class MinMaxObserver:
    """Running max |x| (fp32) and the number of tokens (rows) seen."""

    def __init__(self) -> None:
        self.amax = torch.zeros((), dtype=torch.float32)
        self.tokens = 0
        self.nonfinite = False

    def update(self, x: torch.Tensor) -> None:
        # x: [..., in_features]
        if x.numel() == 0:
            return
        batch_amax = x.detach().abs().amax().float().cpu()
        if not torch.isfinite(batch_amax):
            self.nonfinite = True
        self.amax = torch.maximum(self.amax, batch_amax)
        self.tokens += x.numel() // x.shape[-1]


ACTIVATION_OBSERVERS: dict[str, Callable[[], MinMaxObserver]] = {"minmax": MinMaxObserver}


def weight_absmax_minmax(groups: torch.Tensor, qmax: float, quantize: Callable | None = None) -> torch.Tensor:
    """Plain absmax over the last dim: groups [..., g] -> [...]."""
    return groups.abs().amax(dim=-1)


# A weight observer maps fp32 groups [..., g] to the absmax to scale by, [...]. ``quantize`` (codes from
# groups and scale) lets search-based observers measure the error of a candidate clip.
WEIGHT_OBSERVERS: dict[str, Callable[..., torch.Tensor]] = {"minmax": weight_absmax_minmax}
