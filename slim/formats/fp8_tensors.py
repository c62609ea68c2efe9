"""The per-tensor FP8 tensor layout shared by compressed-tensors ``float-quantized`` and native ``fp8``.

Both store, for one Linear ``<m>``:
    <m>.weight        float8_e4m3fn [out, in]
    <m>.weight_scale  fp32 [1]   (weight ~= weight * weight_scale)
    <m>.input_scale   fp32 [1]   (static per-tensor activation scale; absent for dynamic activations)

vLLM loads both per-tensor scales into fp32 ``PerTensorScaleParameter``s (one slot per fused shard)
and accepts [1] or a 0-d scalar; compressed-tensors writes [1], so we write [1] and read either.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from slim.formats.base import check_module_name, take
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8
from slim.quant.types import QuantizedLinear

FP8_SUFFIXES = ("weight", "weight_scale", "input_scale")


def _per_tensor(module_name: str, what: str, scale: torch.Tensor) -> torch.Tensor:
    """A per-tensor scale as fp32 [1]; anything with more than one element is refused."""
    if scale.numel() != 1:
        raise ValueError(
            f"{module_name}.{what} has shape {tuple(scale.shape)} but this layout is per-tensor (one scale); "
            "per-channel or block FP8 scales are not a slim scheme: re-quantize with fp8_static"
        )
    if not scale.is_floating_point():
        raise ValueError(f"{module_name}.{what} has dtype {scale.dtype}; scales must be floating point")
    return scale.reshape(1).to(torch.float32)


def fp8_tensors(module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """On-disk tensors of one per-tensor FP8 Linear (weight fp8 [out, in], scales fp32 [1])."""
    check_module_name(module_name)
    if q.weight_bits != 8 or q.weight.dtype != FP8_DTYPE:
        raise ValueError(
            f"{module_name}: the FP8 layout needs weight_bits=8 and a {FP8_DTYPE} weight, got "
            f"weight_bits={q.weight_bits}, dtype {q.weight.dtype}; int4 weights need scheme w4a8 "
            "and format compressed-tensors"
        )
    if q.weight.dim() != 2:
        raise ValueError(f"{module_name}.weight must be 2-D [out, in], got shape {tuple(q.weight.shape)}")
    out = {
        f"{module_name}.weight": q.weight.contiguous(),  # fp8 [out, in]
        f"{module_name}.weight_scale": _per_tensor(module_name, "weight_scale", q.weight_scale),  # fp32 [1]
    }
    if q.input_scale is not None:
        out[f"{module_name}.input_scale"] = _per_tensor(module_name, "input_scale", q.input_scale)  # fp32 [1]
    return out


def read_fp8(module_name: str, tensors: Mapping[str, torch.Tensor], fmt_name: str) -> QuantizedLinear:
    """Inverse of :func:`fp8_tensors`; a missing ``input_scale`` reads as dynamic activations (None)."""
    weight = take(tensors, module_name, "weight", fmt_name)
    if weight.dtype != FP8_DTYPE:
        raise ValueError(
            f"{module_name}.weight has dtype {weight.dtype}, expected {FP8_DTYPE} for a {fmt_name} FP8 module"
        )
    scale = _per_tensor(module_name, "weight_scale", take(tensors, module_name, "weight_scale", fmt_name))
    key = f"{module_name}.input_scale"
    input_scale = _per_tensor(module_name, "input_scale", tensors[key]) if key in tensors else None
    return QuantizedLinear(weight=weight, weight_scale=scale, input_scale=input_scale, weight_bits=8)


def dequantize_fp8_linear(q: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """``weight * weight_scale`` in fp32, cast to ``dtype``: [out, in]."""
    return dequantize_fp8(q.weight, q.weight_scale, dtype)
