"""The one-pass reductions equal their two-pass definitions."""

import pytest
import torch

from slim.quant.stats import absmax, all_finite


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
