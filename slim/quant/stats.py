"""One-pass reductions used on every weight: absmax and the NaN/Inf check.

Both go through ``torch.aminmax``, a single vectorized pass (several times faster on CPU than ``abs().amax()``
or ``isfinite().all()``, which each write a full-size temporary). NaN propagates through it, and an infinity
lands in the min or the max, so ``all_finite`` is exact.
"""

from __future__ import annotations

import torch


def absmax(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim)``, bit for bit (a zero comes out +0.0), in one pass; ``dim=None`` reduces
    everything."""
    lo, hi = torch.aminmax(x) if dim is None else torch.aminmax(x, dim=dim, keepdim=keepdim)
    return torch.maximum(-lo, hi) + 0.0  # + 0.0 turns the -0.0 of an all-zero group into +0.0


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` (floating point) holds no NaN or Inf; an empty tensor is finite."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
