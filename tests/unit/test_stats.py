"""The one-pass reductions equal their two-pass definitions."""

import pytest
import torch

from slim.quant.fp8 import FP8_MAX, fp8_scale
from slim.quant.int4 import INT4_HALF_RANGE, int4_scale
from slim.quant.stats import absmax, all_finite, div_exact

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_absmax_is_abs_amax_bit_for_bit(dtype):
    x = torch.randn(6, 5, 16, generator=torch.Generator().manual_seed(0)).to(dtype)
    x[1, 2] = 0.0  # an all-zero group: +0.0, as abs().amax() gives
    x[2, 3] = -x[2, 3].abs()  # a group whose absmax is a negative value
    kept = absmax(x, dim=-1, keepdim=True)
    assert torch.equal(kept, x.abs().amax(dim=-1, keepdim=True)) and kept.shape == (6, 5, 1)
    for dim in (None, -1, 1):
        got = absmax(x) if dim is None else absmax(x, dim=dim)
        want = x.abs().amax() if dim is None else x.abs().amax(dim=dim)
        assert got.dtype == want.dtype and torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                                                       want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_all_finite_finds_one_bad_value(bad):
    x = torch.randn(64, 64)
    assert all_finite(x) and all_finite(torch.empty(0))
    x[17, 5] = bad
    assert not all_finite(x) and not all_finite(x.to(torch.bfloat16))
    assert absmax(x).isnan() if bad != bad else absmax(x).isinf()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("divisor", "scale_fn"), [(FP8_MAX, fp8_scale), (INT4_HALF_RANGE, int4_scale)])
def test_scales_are_correctly_rounded_quotients_on_every_device(device, divisor, scale_fn):
    """amax / 448 and absmax / 7.5 as IEEE fp32 division gives them (what the CPU and compressed-tensors compute),
    also on CUDA, where PyTorch would multiply by the fp32 reciprocal of a Python divisor instead."""
    x = torch.rand(1 << 16, generator=torch.Generator().manual_seed(0)) * 100
    want = (x.double() / divisor).float()  # fp32 / fp32 rounded once: float64 then float32 never double-rounds
    reciprocal = x * torch.tensor(1 / divisor, dtype=torch.float32)
    assert (reciprocal != want).sum() > 100  # the reciprocal product is off for these inputs: the test can fail
    assert torch.equal(div_exact(x.to(device), divisor).cpu(), want)
    assert torch.equal(scale_fn(x.to(device)).cpu(), want)
