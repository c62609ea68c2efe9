"""FP8 numerics against their definition and against compressed-tensors."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from slim.quant.fp8 import (
    FP8_DTYPE,
    FP8_MAX,
    _fp8_over_256,
    dequantize_fp8,
    dequantize_fp8_block,
    fake_quantize_fp8,
    fp8_scale,
    fp8_to_float32,
    quantize_fp8,
    quantize_fp8_block,
)

FP8_TENSOR = QuantizationArgs(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR, symmetric=True)


def sqnr_db(x, y):
    return 10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()).item()


def test_scale_is_amax_over_448_and_never_zero():
    assert fp8_scale(torch.tensor(448.0)).item() == 1.0
    assert fp8_scale(torch.tensor(0.0)).item() == torch.finfo(torch.float32).eps


def test_quantize_matches_definition_and_clamps():
    x = torch.tensor([0.0, 1.0, -3.5, 1000.0, -1e9])
    s = torch.tensor([0.5])
    q = quantize_fp8(x, s)
    assert q.dtype == FP8_DTYPE
    expected = torch.clamp(x / s, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8))
    assert q.float().abs().max().item() == FP8_MAX  # overflow saturates, never NaN


@pytest.mark.parametrize("shape", [(64, 96), (300, 128)])
def test_bit_exact_with_compressed_tensors(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    scale, zp = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), FP8_TENSOR)
    ours = fp8_scale(w.abs().amax().reshape(1))
    assert torch.equal(scale.float(), ours)
    ref = quantize(w, scale, zp, FP8_TENSOR, dtype=FP8_DTYPE)
    assert torch.equal(quantize_fp8(w, ours).view(torch.uint8), ref.view(torch.uint8))
    assert torch.equal(dequantize_fp8(ref, ours), dequantize(ref, scale, zp, FP8_TENSOR, dtype=torch.float32))


def test_sqnr_floor_per_tensor_gaussian():
    torch.manual_seed(1)
    w = torch.randn(1024, 1024)
    s = fp8_scale(w.abs().amax())
    assert sqnr_db(w, fake_quantize_fp8(w, s)) > 25


@pytest.mark.parametrize("shape", [(256, 256), (576, 256), (100, 300)])
def test_block_round_trip_ragged(shape):
    torch.manual_seed(2)
    w = torch.randn(shape) * 0.05
    q, s = quantize_fp8_block(w)
    assert q.shape == w.shape and q.dtype == FP8_DTYPE
    assert s.shape == (-(-shape[0] // 128), -(-shape[1] // 128)) and s.dtype == torch.float32
    # each block's scale is that block's own amax / 448 (ragged edge blocks included)
    r, c = shape[0] - 1, shape[1] - 1
    edge = w[(r // 128) * 128 :, (c // 128) * 128 :]
    assert torch.isclose(s[-1, -1], edge.abs().amax() / 448)
    d = dequantize_fp8_block(q, s, dtype=torch.float32)
    assert sqnr_db(w, d) > 28
    # definition: dequant = fp8 value * its block's scale
    assert torch.equal(d[r, c], q[r, c].float() * s[-1, -1])


def test_cpu_decode_is_torchs_cast_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8)
    every_pair = torch.stack(torch.meshgrid(codes, codes, indexing="ij"), -1).reshape(-1).view(FP8_DTYPE)
    out = fp8_to_float32(every_pair)  # NaN codes too: compare the bits
    assert out.dtype == torch.float32 and torch.equal(out.view(torch.int32), every_pair.float().view(torch.int32))
    odd, strided = every_pair[:5], every_pair.view(256, 512)[:, ::2]  # the plain-cast paths
    assert torch.equal(fp8_to_float32(odd).view(torch.int32), odd.float().view(torch.int32))
    assert torch.equal(fp8_to_float32(strided).view(torch.int32), strided.float().view(torch.int32))
    x = torch.randn(4, 6)
    y = fp8_to_float32(x)
    assert torch.equal(y, x) and y.data_ptr() != x.data_ptr()  # a copy: callers scale it in place


# (384, 4096): decoded on the CPU in chunks of 64 rows, two per 128-row block (CPU_DECODE_CHUNK = 2**18 values)
@pytest.mark.parametrize("shape", [(256, 384), (100, 300), (128, 130), (384, 4096)])
def test_block_dequantize_is_code_times_its_blocks_scale(shape):
    torch.manual_seed(3)
    q, s = quantize_fp8_block(torch.randn(shape))
    s = s * torch.rand_like(s)  # any scales
    rows = torch.arange(shape[0])[:, None] // 128
    cols = torch.arange(shape[1])[None, :] // 128
    want = q.float() * s[rows, cols]
    assert torch.equal(dequantize_fp8_block(q, s, dtype=torch.float32), want)
    assert torch.equal(dequantize_fp8_block(q, s), want.to(torch.bfloat16))


def test_cpu_decode_is_the_code_over_256_bit_for_bit():
    codes = torch.arange(256, dtype=torch.uint8)
    finite = (codes & 0x7F) != 0x7F
    fp8 = codes[finite].view(FP8_DTYPE)  # every finite code: zeros, subnormals, normals, both signs
    got = _fp8_over_256(fp8)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), (fp8.float() / 256).view(torch.int32))
    assert torch.equal(got.mul(256).view(torch.int32), fp8.float().view(torch.int32))
    strided = fp8[::3]
    assert torch.equal(fp8_to_float32(strided).view(torch.int32), strided.float().view(torch.int32))
    assert _fp8_over_256(codes.view(FP8_DTYPE)) is None  # a NaN code: left to torch's cast
    assert _fp8_over_256(codes[:0].view(FP8_DTYPE)) is None


@pytest.mark.parametrize("scale_kind", ["nan_code", "huge", "subnormal"])
def test_block_dequantize_edge_cases_are_exact(scale_kind):
    """The CPU decode multiplies (code / 256) by (scale * 256): the same product, rounded once. Where that
    cannot hold (a NaN code, a scale whose * 256 overflows) it decodes plainly; subnormal scales need nothing."""
    torch.manual_seed(5)
    q, s = quantize_fp8_block(torch.randn(256, 384))
    if scale_kind == "nan_code":
        q.view(torch.uint8)[70, 200] = 0xFF
    elif scale_kind == "huge":
        s[1, 2] = torch.finfo(torch.float32).max / 100  # * 256 overflows; codes above 100 decode to inf
    else:
        s = s * 2.0**-140  # fp32 subnormals
    rows = torch.arange(256)[:, None] // 128
    cols = torch.arange(384)[None, :] // 128
    want = q.float() * s[rows, cols]
    got = dequantize_fp8_block(q, s, dtype=torch.float32)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # NaN and inf bits included
    if scale_kind == "nan_code":
        assert got[70, 200].isnan() and got.isnan().sum() == 1


def test_block_scale_shape_mismatch_is_reported():
    q, s = quantize_fp8_block(torch.randn(256, 256))
    with pytest.raises(ValueError, match="weight_scale_inv shape"):
        dequantize_fp8_block(q, s[:1])
