"""Elementary operations used on every weight, the same to the bit on every device.

``absmax`` and ``all_finite`` take the min and the max instead of writing a full-size temporary as
``abs().amax()`` or ``isfinite().all()`` do. Over a whole tensor that is ``torch.aminmax``, one vectorized pass;
along a dim, ``amax`` and ``amin`` separately (on a CPU, ``aminmax`` over small groups is much slower than
the two plain reductions). NaN propagates through both, and an infinity lands in the min or the
max, so ``all_finite`` is exact.

``div_exact`` divides by a constant with IEEE (correctly rounded) division on every device. ``x / 448.0`` is
not that on CUDA: PyTorch turns a division by a CPU scalar into a multiplication by its fp32 reciprocal there,
which is one ulp off for some ``x``, so scales computed on a GPU would differ from the CPU's (and from
compressed-tensors' on CPU).
"""

from __future__ import annotations

import torch


def absmax(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """``x.abs().amax(dim, keepdim)``, bit for bit (a zero comes out +0.0), without a full-size temporary;
    ``dim=None`` reduces everything."""
    lo, hi = torch.aminmax(x) if dim is None else (x.amin(dim, keepdim), x.amax(dim, keepdim))
    return torch.maximum(-lo, hi) + 0.0  # + 0.0 turns the -0.0 of an all-zero group into +0.0


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` (floating point) holds no NaN or Inf; an empty tensor is finite."""
    if x.numel() == 0:
        return True
    lo, hi = torch.aminmax(x)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def div_exact(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device: the divisor is a 0-d tensor on ``x``'s device (a fill,
    no host transfer), which PyTorch divides element by element instead of multiplying by a reciprocal."""
    return torch.div(x, torch.full((), divisor, dtype=x.dtype, device=x.device))
