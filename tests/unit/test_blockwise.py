"""Quantizing a block of rows at a time writes the same bytes as the scheme on the whole tensor."""

import math

import pytest
import torch

from slim.quant.fp8 import fake_quantize_input
from slim.quant.blockwise import quantize_blockwise
from slim.quant.schemes import SCHEMES, dequantize_weight


def weight(out_features=300, in_features=512):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[7] *= 30  # one row far larger: the per-tensor scale is not any block's own
    return w.to(torch.bfloat16)


@pytest.mark.parametrize(("scheme", "observer"), [("w4a8", "minmax"), ("w4a8", "mse"), ("fp8_static", "minmax"),
                                                  ("fp8_static", "mse"), ("w4a8_dynamic", "minmax")])
@pytest.mark.parametrize("block", [512 * 64, 512 * 7, 1 << 30])  # 64 rows, 7 rows (300 = 42 x 7 + 6), whole
def test_blocks_give_the_whole_tensor_bytes_and_quality(scheme, observer, block):
    s = SCHEMES[scheme]
    w = weight()
    amax = torch.tensor(3.0) if s.static_activations else None
    sample = torch.randn(16, 512, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    want = s.quantize(w.float(), amax, 128, observer, torch.bfloat16)
    got, quality = quantize_blockwise(s, w, amax, 128, observer, torch.bfloat16, sample=sample, block=block)
    assert got.weight.dtype == want.weight.dtype and got.weight_scale.dtype == want.weight_scale.dtype
    assert torch.equal(got.weight.view(torch.int8), want.weight.view(torch.int8))
    assert torch.equal(got.weight_scale, want.weight_scale)
    assert got.input_scale is None if amax is None else torch.equal(got.input_scale, want.input_scale)
    # quality against float64 sums over the whole tensor
    wf, wq = w.double(), dequantize_weight(want, torch.float64)
    assert quality.sqnr_db == pytest.approx(20 * math.log10(wf.norm() / (wq - wf).norm()), abs=1e-3)  # fp32 norms
    x = sample.float()
    ref = x.double() @ wf.T
    out = fake_quantize_input(x, want.input_scale).double() @ wq.T
    assert quality.output_rel_err == pytest.approx(float((out - ref).norm() / ref.norm()), rel=1e-5)


def test_no_sample_no_output_error():
    _, quality = quantize_blockwise(SCHEMES["w4a8_dynamic"], weight(), None, 128, block=512 * 8)
    assert quality.output_rel_err is None and 15 < quality.sqnr_db < 30
