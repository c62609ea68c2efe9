"""Observers: statistics gathered from tensors that decide quantization scales. One registry entry each.

Activation observers see calibration inputs batch by batch (``update``) and can be merged across ranks by
MAX, which is order-independent: a distributed run gives the same scales as a single process.
Weight observers choose, per tensor or per group, the absolute value the scale is derived from
(``scale = clip / qmax``): ``minmax`` takes the plain absmax, ``mse`` searches a clip that minimises the
quantization error of that group.
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

# fake_quant(groups [..., g], clip [...]) -> dequantized groups [..., g]: the scheme's round trip at a clip.
FakeQuant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weight_clip_minmax(groups: torch.Tensor, fake_quant: FakeQuant) -> torch.Tensor:
    """Plain absmax over the last dim: groups [..., g] -> [...]."""
    return groups.abs().amax(dim=-1)


def weight_clip_mse(groups: torch.Tensor, fake_quant: FakeQuant, grid: int = 100, max_shrink: float = 0.8) -> torch.Tensor:
    """Per group, the clip ``absmax * r`` (r from 1.0 down to ``1 - max_shrink`` in steps of 1/grid) with the
    smallest squared quantization error. r = 1 is a candidate, so the error is never worse than minmax."""
    absmax = groups.abs().amax(dim=-1)  # [...]
    best_clip = absmax.clone()
    best_err = (fake_quant(groups, absmax) - groups).pow(2).sum(dim=-1)
    for i in range(1, int(max_shrink * grid) + 1):
        clip = absmax * (1 - i / grid)
        err = (fake_quant(groups, clip) - groups).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


WEIGHT_OBSERVERS: dict[str, Callable[[torch.Tensor, FakeQuant], torch.Tensor]] = {
    "minmax": weight_clip_minmax,
    "mse": weight_clip_mse,
}
