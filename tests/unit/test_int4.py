"""int4 per-group numerics against their definition and compressed-tensors."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from slim.quant.int4 import dequantize_int4, group_view, int4_scale, quantize_int4
from slim.quant.schemes import SCHEMES, dequantize_weight


def args(g):
    return QuantizationArgs(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP, group_size=g, symmetric=True)


@pytest.mark.parametrize("g", [32, 64, 128])
def test_bit_exact_with_compressed_tensors_fp32(g):
    torch.manual_seed(0)
    w = torch.randn(48, 256) * 0.02
    groups = group_view(w, g)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args(g))
    ours = int4_scale(groups.abs().amax(-1))
    assert torch.equal(scale, ours)
    ref = quantize(w, scale, zp, args(g), dtype=torch.int8)
    codes = quantize_int4(w, ours, g)
    assert torch.equal(codes, ref)
    assert codes.min() >= -8 and codes.max() <= 7
    assert torch.equal(dequantize_int4(codes, ours, g), dequantize(ref, scale, zp, args(g), dtype=torch.float32))


def test_scale_is_absmax_over_7_5():
    w = torch.zeros(1, 128)
    w[0, 3] = -1.5
    assert int4_scale(group_view(w, 128).abs().amax(-1)).item() == pytest.approx(0.2)
    assert quantize_int4(w, torch.tensor([[0.2]]), 128)[0, 3].item() == -8  # -1.5 / 0.2 = -7.5 -> -8


def test_sqnr_floor_g128_gaussian():
    torch.manual_seed(1)
    w = torch.randn(512, 1024)
    q = SCHEMES["w4a8"].quantize(w, torch.tensor(1.0), group_size=128)
    d = dequantize_weight(q)
    assert 10 * torch.log10(w.pow(2).sum() / (w - d).pow(2).sum()) > 14


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="does not divide"):
        group_view(torch.zeros(4, 100), 128)
