"""FP8 e4m3 numerics: per-tensor scales, quantize/dequantize, and DeepSeek's 128x128 block format.

Pure functions of tensors. Arithmetic is done in fp32 whatever the input dtype, and values are clamped
to +-448 before the cast because the overflow behaviour of the fp8 cast differs across devices.
"""

from __future__ import annotations

import torch

from slim import kernels
from slim.kernels import check_block_scale
from slim.quant.stats import absmax, div_exact

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Block-FP8 weights are decoded on a CPU this many values at a time at most (whole rows): the float32 temporary
# stays in cache (and in the heap, with slim.hostmem), where a whole 2048 x 7168 expert is 58 MB of fresh pages.
CPU_DECODE_CHUNK = 1 << 18
# compressed-tensors replaces a zero scale by the fp32 epsilon; we do the same so files agree.
_SCALE_EPS = torch.finfo(torch.float32).eps


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Symmetric FP8 scale ``amax / 448`` in fp32; a zero amax gives the fp32 epsilon, never 0."""
    scale = div_exact(amax.float(), FP8_MAX)
    return torch.where(scale == 0, torch.full_like(scale, _SCALE_EPS), scale)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x / scale, -448, 448)`` cast to float8_e4m3fn (division in fp32)."""
    return torch.div(x.float(), scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def fp8_to_float32(q: torch.Tensor) -> torch.Tensor:
    """``q.float()`` for float8_e4m3fn, bit for bit, NaN codes included. On a CPU the codes are decoded by
    :func:`_fp8_over_256` (a table lookup, cheaper than torch's element-wise cast there). Always a new tensor
    (callers scale it in place), also for input that is not FP8."""
    if q.dtype != FP8_DTYPE:
        return q.to(torch.float32, copy=True)
    x = _fp8_over_256(q)
    return q.float() if x is None else x.mul_(256.0)


def _fp8_over_256(q: torch.Tensor) -> torch.Tensor | None:
    """``q.float() / 256`` exactly, for float8_e4m3fn codes on a CPU; None for a NaN code or another device.

    e4m3's 7 magnitude bits shifted left by 7 are the float16 with the same exponent and mantissa bits, whose
    bias is 8 more (15 vs 7): that float16 is the code's value / 2**8, subnormals included, and float16 ->
    float32 is exact (F16C). The sign moves from bit 7 to bit 15: the int8 -> int16 cast sign-extends, so after
    the shift bits 15 and 14 both hold it, and the mask clears bit 14. The two NaN codes (0x7F, 0xFF) would come
    out as +-480: they are looked for first, on the bytes, and left to torch's cast.
    """
    if q.device.type != "cpu" or q.numel() == 0:
        return None
    codes = q.view(torch.uint8)
    if int(torch.bitwise_and(codes, 0x7F).amax()) == 0x7F:
        return None
    bits = q.view(torch.int8).to(torch.int16).bitwise_left_shift_(7).bitwise_and_(~0x4000)
    return bits.view(torch.float16).float()


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q * scale`` computed in fp32, returned as ``dtype``."""
    return fp8_to_float32(q).mul_(scale.float()).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize round trip, same dtype as ``x`` (simulated FP8)."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)


def _block_view(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, int, int]:
    """Zero-pad a 2D tensor to whole blocks; return it as [rb, bm, cb, bn] plus the original shape."""
    rows, cols = x.shape
    bm, bn = block
    rb, cb = -(-rows // bm), -(-cols // bn)
    padded = torch.zeros(rb * bm, cb * bn, dtype=x.dtype, device=x.device)
    padded[:rows, :cols] = x
    return padded.view(rb, bm, cb, bn), rows, cols


def quantize_fp8_block(
    weight: torch.Tensor, block: tuple[int, int] = (128, 128)
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3/R1 block FP8: one fp32 ``weight_scale_inv`` per block, ragged edges zero-padded.

    weight [out, in] -> (fp8 [out, in], scale_inv fp32 [ceil(out/bm), ceil(in/bn)]),
    with ``weight ~= fp8 * scale_inv`` block by block.
    """
    blocks, rows, cols = _block_view(weight.float(), block)  # [rb, bm, cb, bn]
    amax = blocks.abs().amax(dim=(1, 3))  # [rb, cb]
    scale_inv = fp8_scale(amax)
    q = quantize_fp8(blocks, scale_inv[:, None, :, None])
    q = q.view(blocks.shape[0] * block[0], blocks.shape[2] * block[1])[:rows, :cols].contiguous()
    return q, scale_inv


def dequantize_fp8_block(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = (128, 128),
    dtype: torch.dtype = torch.bfloat16,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8_block`: ``q * scale_inv`` per block, in fp32, cast to ``dtype``; into
    ``out`` (``dtype``, q's shape, contiguous) when given."""
    check_block_scale(q, scale_inv, block)
    rows, cols = q.shape
    bm, bn = block
    rb, cb = scale_inv.shape
    if q.device.type == "cpu":
        decoded = kernels.fp8_block_decode(q, scale_inv, block, dtype, out)  # one fused pass, the same bytes
        if decoded is not None:
            return decoded[0]
    if out is not None:
        return out.copy_(dequantize_fp8_block(q, scale_inv, block, dtype))
    if rows % bm == 0 and cols % bn == 0:  # whole blocks: broadcast the block scale, in place
        if q.device.type != "cpu":
            x = fp8_to_float32(q).view(rb, bm, cb, bn)
            return x.mul_(scale_inv.float()[:, None, :, None]).view(rows, cols).to(dtype)
        out = torch.empty(rows, cols, dtype=dtype)  # on a CPU a few rows at a time, in cache
        step = bm
        while step % 2 == 0 and step * cols > CPU_DECODE_CHUNK:
            step //= 2
        scale = scale_inv.float()
        scale_256 = scale * 256.0  # exact, so (code / 256) * (scale * 256) rounds the same product once
        if not bool(torch.isfinite(scale_256).all()):
            scale_256 = None  # a scale within 2**8 of fp32's largest: multiply the plain decoded value
        for r in range(0, rows, step):
            chunk = q[r : r + step]
            x = _fp8_over_256(chunk) if scale_256 is not None else None
            x, s = (chunk.float(), scale) if x is None else (x, scale_256)  # None: torch's cast (NaN codes)
            x = x.view(step, cb, bn).mul_(s[r // bm][None, :, None])
            out[r : r + step].view(step, cb, bn).copy_(x)  # copy_ rounds to ``dtype`` as .to() does
        return out
    scale = scale_inv.float().repeat_interleave(bm, 0)[:rows].repeat_interleave(bn, 1)[:, :cols]
    return fp8_to_float32(q).mul_(scale).to(dtype)


def fake_quantize_input(x: torch.Tensor, input_scale: torch.Tensor | None) -> torch.Tensor:
    """FP8 quantize-dequantize of a Linear's input: static per-tensor scale, or dynamic per token if None."""
    if input_scale is not None:
        return fake_quantize_fp8(x, input_scale.to(x.device))
    return fake_quantize_fp8(x, fp8_scale(absmax(x, dim=-1, keepdim=True)))
