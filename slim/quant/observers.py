"""Observers: statistics gathered from tensors that decide quantization scales. One registry entry each.

Activation observers see calibration inputs batch by batch (``update``) and can be merged across ranks by
MAX, which is order-independent: a distributed run gives the same scales as a single process.
Weight observers choose, per tensor or per group, the absolute value the scale is derived from
(``scale = clip / qmax``): ``minmax`` takes the plain absmax, ``mse`` searches a clip that minimises the
quantization error of that group (``sum |err|^2.4``, as llm-compressor's MSE observer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from slim.quant.stats import absmax


class MinMaxObserver:
    """Running max |x| (fp32), the number of tokens (rows) seen, and the first ``sample_rows`` rows
    (kept to measure the quantized module's output error)."""

    def __init__(self, sample_rows: int = 32) -> None:
        self.amax = torch.zeros((), dtype=torch.float32)
        self.tokens = 0
        self.nonfinite = False
        self.sample_rows = sample_rows
        self.sample: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        # x: [..., in_features]
        if x.numel() == 0:
            return
        batch_amax = absmax(x.detach()).float().cpu()
        if not torch.isfinite(batch_amax):
            self.nonfinite = True
        self.amax = torch.maximum(self.amax, batch_amax)
        self.tokens += x.numel() // x.shape[-1]
        have = 0 if self.sample is None else self.sample.shape[0]
        if have < self.sample_rows:
            rows = x.detach().reshape(-1, x.shape[-1])[: self.sample_rows - have].clone()
            self.sample = rows if self.sample is None else torch.cat([self.sample, rows])


ACTIVATION_OBSERVERS: dict[str, Callable[[], MinMaxObserver]] = {"minmax": MinMaxObserver}

# fake_quant(groups [..., g], clip [...]) -> dequantized groups [..., g]: the scheme's round trip at a clip.
FakeQuant = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def weight_clip_minmax(groups: torch.Tensor, fake_quant: FakeQuant) -> torch.Tensor:
    """Plain absmax over the last dim: groups [..., g] -> [...]."""
    return absmax(groups, dim=-1)


def weight_clip_mse(groups: torch.Tensor, fake_quant: FakeQuant, grid: int = 100, max_shrink: float = 0.2,
                    norm: float = 2.4) -> torch.Tensor:
    """Per group, the clip ``absmax * r`` (r from 1.0 down to ``1 - max_shrink`` in steps of 1/grid) with the
    smallest quantization error ``sum |w - q(w)|^norm``. r = 1 is a candidate, so that error is never worse
    than minmax's. The defaults are llm-compressor's MSE observer's (shrink at most 20%, norm 2.4): the
    exponent above 2 and the small shrink keep the largest weights, which matter most to the layer output,
    from being clipped to buy a lower plain MSE."""
    amax = absmax(groups, dim=-1)  # [...]
    best_clip = amax.clone()
    best_err = (fake_quant(groups, amax) - groups).abs().pow(norm).sum(dim=-1)
    for i in range(1, int(max_shrink * grid) + 1):
        clip = amax * (1 - i / grid)
        err = (fake_quant(groups, clip) - groups).abs().pow(norm).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


WEIGHT_OBSERVERS: dict[str, Callable[[torch.Tensor, FakeQuant], torch.Tensor]] = {
    "minmax": weight_clip_minmax,
    "mse": weight_clip_mse,
}
