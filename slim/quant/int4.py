"""Symmetric int4 per-group weight numerics (groups of ``group_size`` along the input dim).

Scale convention is compressed-tensors': ``s_g = absmax_g / 7.5`` and ``q = clamp(round(w / s_g), -8, 7)``,
computed in fp32 whatever the weight dtype.
"""

from __future__ import annotations

import torch

from slim.quant.stats import div_exact

INT4_MIN, INT4_MAX = -8, 7
INT4_HALF_RANGE = (INT4_MAX - INT4_MIN) / 2  # 7.5
_SCALE_EPS = torch.finfo(torch.float32).eps


def group_view(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, in // group_size, group_size] (fp32)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
    return weight.float().reshape(out_features, in_features // group_size, group_size)


def int4_scale(absmax: torch.Tensor) -> torch.Tensor:
    """``absmax / 7.5`` in fp32; zero groups get the fp32 epsilon (compressed-tensors does the same)."""
    scale = div_exact(absmax.float(), INT4_HALF_RANGE)
    return torch.where(scale == 0, torch.full_like(scale, _SCALE_EPS), scale)


def round_groups(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """groups [..., g] fp32, scale [...] -> codes [..., g] as fp32 values in [-8, 7]."""
    return torch.div(groups, scale.float()[..., None]).round_().clamp_(INT4_MIN, INT4_MAX)


def quantize_int4(weight: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight [out, in], scale [out, in // g] -> int8 codes in [-8, 7], shape [out, in]."""
    return quantize_groups(group_view(weight, group_size), scale)


def quantize_groups(groups: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """groups [out, G, g] (fp32), scale [out, G] -> int8 codes in [-8, 7], shape [out, G * g]."""
    return round_groups(groups, scale).to(torch.int8).reshape(groups.shape[0], -1)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int, dtype=torch.float32) -> torch.Tensor:
    """int8 codes [out, in] * per-group scale [out, in // g] -> weight [out, in] (fp32 math)."""
    groups = q.to(torch.float32, copy=True).reshape(q.shape[0], -1, group_size)  # [out, G, g], ours
    return groups.mul_(scale.float()[..., None]).reshape(q.shape).to(dtype)
