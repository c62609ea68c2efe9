"""Activation observers for static FP8 (mse, percentile) against their definitions; merging is exact."""

import math

import pytest
import torch

from slim.config import validate
from slim.errors import SlimError
from slim.quant.fp8 import fake_quantize_fp8, fp8_scale
from slim.quant.observers import (
    ACTIVATION_OBSERVERS, MANTISSA_BITS, MSE_ROWS, MSE_TOP_ROWS, MinMaxObserver, MSEObserver, PercentileObserver,
    input_clip_errors, resolve_input_clips,
)
from tests.helpers.configs import compose_config


def heavy(shape, seed, df=2.0):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(df).sample(shape)


def output_error(rows, weight, clip):
    """The definition the mse observer minimises: ||fq(X, clip/448) W^T - X W^T||^2 (fp64)."""
    x = rows.float()
    fq = fake_quantize_fp8(x, fp8_scale(torch.tensor([float(clip)])))
    return ((fq - x) @ weight.float().t()).double().pow(2).sum().item()


def feed(obs, x, batch):
    for i in range(0, x.shape[0], batch):
        obs.update(x[i:i + batch])
    return obs


def test_registry_and_validation_name_the_choices():
    assert set(ACTIVATION_OBSERVERS) == {"minmax", "mse", "percentile"}
    for name in ("mse", "percentile"):
        assert validate(compose_config(f"scheme.activation_observer={name}")).scheme.activation_observer == name
    with pytest.raises(SlimError, match="scheme.activation_observer.*minmax, mse, percentile"):
        validate(compose_config("scheme.activation_observer=kl"))


@pytest.mark.parametrize("q", [99.99, 99.9, 90.0, 50.0])
def test_percentile_is_torch_quantile_within_one_bin(q):
    x = heavy((3000, 64), 0) * 0.1  # [tokens, in]
    obs = feed(PercentileObserver(q=q), x.reshape(30, 100, 64), 4)
    true = torch.quantile(x.abs().reshape(-1).double(), q / 100, interpolation="higher").item()
    clip = obs.select_clip(torch.eye(64)).item()
    assert true <= clip <= true * (1 + 2.0**-MANTISSA_BITS), (true, clip)  # one bin: 1/32 of its lower edge
    assert clip < obs.amax.item()  # heavy tails: the percentile is below the absmax


def test_percentile_100_is_the_absmax_and_zero_input_keeps_zero():
    x = heavy((500, 16), 1)
    obs = feed(PercentileObserver(q=100.0), x, 50)
    assert obs.select_clip(torch.eye(16)).item() == obs.amax.item()
    zero = feed(PercentileObserver(), torch.zeros(10, 16), 5)
    assert zero.select_clip(torch.eye(16)).item() == 0.0
    with pytest.raises(ValueError, match="percentile"):
        PercentileObserver(q=0.0)


def test_percentile_merge_equals_one_observer():
    x = heavy((1000, 32), 2)
    one = feed(PercentileObserver(), x, 100)
    parts = [feed(PercentileObserver(), x[r::2], 7) for r in range(2)]
    total = parts[0].counts() + parts[1].counts()
    amax = torch.maximum(parts[0].amax, parts[1].amax)
    for p in parts:  # what Dist.reduce_observers does: SUM of counts() in place, MAX of amax
        p.counts().copy_(total)
        p.amax = amax
    for p in parts:
        assert torch.equal(p.hist, one.hist)
        assert p.select_clip(torch.eye(32)).item() == one.select_clip(torch.eye(32)).item()


def test_mse_clip_never_worse_than_minmax_on_its_rows_and_better_with_outliers():
    torch.manual_seed(3)
    w = torch.randn(48, 64) * 0.05  # [out, in]
    for df, seed in ((1.0, 4), (3.0, 5), (30.0, 6)):
        x = heavy((600, 64), seed, df)
        obs = feed(MSEObserver(), x, 64)
        clip = obs.select_clip(w)
        rows, weights = obs.weighted_rows()
        assert rows.shape[0] <= MSE_ROWS + MSE_TOP_ROWS and weights.sum().item() == pytest.approx(600)
        assert clip <= obs.amax
        err_clip, err_minmax = input_clip_errors(rows, w, [clip, obs.amax], weights)
        assert err_clip <= err_minmax
        # brute force over the same grid, from the definition: the observer found the minimum
        grid = [obs.amax * 2 ** (-i / 8) for i in range(25)]
        by_definition = [sum(wt * output_error(r[None], w, c) for r, wt in zip(rows, weights.tolist())) for c in grid]
        assert err_clip == pytest.approx(min(by_definition), rel=1e-6)  # fp32 products, row by row here
    # an outlier channel the weight ignores: clipping it costs no output error, and the finer scale keeps the
    # small inputs out of FP8's flushed range (below 2**-9 * scale) -- the objective is the output, not the input
    x = torch.randn(600, 64) * 1e-3
    x[:, 0] = 1e3
    w0 = w.clone()
    w0[:, 0] = 0.0
    obs = feed(MSEObserver(), x, 64)
    rows, weights = obs.weighted_rows()
    clip = obs.select_clip(w0)
    assert clip < obs.amax
    assert input_clip_errors(rows, w0, [clip], weights)[0] < 0.5 * input_clip_errors(rows, w0, [obs.amax], weights)[0]


def test_mse_keeps_the_outlier_rows_a_uniform_sample_misses():
    torch.manual_seed(11)
    x = torch.randn(4000, 32)
    x[::500, 0] = 200.0  # one outlier token per "sequence", 8 in all (attention-sink-like)
    obs = feed(MSEObserver(), x, 100)
    outliers = {tuple(r.tolist()) for r in x[::500]}
    assert outliers <= {tuple(r.tolist()) for r in obs.top.rows}
    w = torch.randn(16, 32)
    clip = obs.select_clip(w)
    # the exact error over every row: the clip is no worse than minmax's there either
    err = lambda c: output_error(x, w, c)  # noqa: E731
    assert err(clip) <= err(obs.amax) * (1 + 1e-9)


def test_mse_rows_are_bounded_and_independent_of_order_and_partition():
    x = heavy((4 * MSE_ROWS, 32), 8).to(torch.bfloat16)
    one = feed(MSEObserver(), x, 50)
    assert one.uniform.rows.shape == (MSE_ROWS, 32) and one.uniform.rows.dtype == torch.bfloat16
    assert one.top.rows.shape == (MSE_TOP_ROWS, 32)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))
    shuffled = feed(MSEObserver(), x[perm], 33)
    for a, b in ((one.uniform, shuffled.uniform), (one.top, shuffled.top)):
        assert torch.equal(a.rows, b.rows) and torch.equal(a.hashes, b.hashes)
    parts = [feed(MSEObserver(), x[r::2], 17) for r in range(2)]  # two ranks' slices
    states = [p.state() for p in parts]
    amax, tokens = torch.maximum(parts[0].amax, parts[1].amax), parts[0].tokens + parts[1].tokens
    for p in parts:  # what Dist.reduce_observers does: MAX, SUM, then merge every rank's state
        p.amax, p.tokens = amax, tokens
        p.merge(states)
        assert torch.equal(p.uniform.rows, one.uniform.rows) and torch.equal(p.top.rows, one.top.rows)
    w = torch.randn(16, 32)
    assert parts[0].select_clip(w).item() == parts[1].select_clip(w).item() == one.select_clip(w).item()


def test_resolve_input_clips_sets_the_clip_once_and_leaves_minmax_alone():
    torch.manual_seed(9)
    lin = torch.nn.Linear(32, 8, bias=False)
    x = heavy((400, 32), 10, 1.0) * 100
    obs = {"mm": feed(MinMaxObserver(), x, 40), "pc": feed(PercentileObserver(q=99.0), x, 40),
           "none": PercentileObserver()}
    amax = obs["mm"].amax.clone()
    resolve_input_clips({"mm": lin, "pc": lin, "none": lin}, obs)
    assert torch.equal(obs["mm"].amax, amax) and not hasattr(obs["mm"], "observed_amax")
    assert obs["pc"].amax < amax and torch.equal(obs["pc"].observed_amax, amax)
    assert obs["none"].tokens == 0 and obs["none"].amax.item() == 0.0  # no token: left to resolve_amax's fallback
    clip = obs["pc"].amax.clone()
    resolve_input_clips({"mm": lin, "pc": lin, "none": lin}, obs)  # a second call changes nothing
    assert torch.equal(obs["pc"].amax, clip)
    assert math.isfinite(clip.item())


def test_row_hash_is_an_exact_integer_sum():
    from slim.quant.observers import _HASH_COEFFS, row_hash

    rows = torch.tensor([[1.0, -2.0, 0.0, -0.0], [3.5, 3.5, 3.5, 3.5]])
    h = row_hash(rows)
    a = _HASH_COEFFS[4].tolist()
    for r, got in zip(rows, h.tolist()):
        bits = [int(v) & 0xFFFFFFFF for v in r.view(torch.int32).tolist()]
        assert got == sum(b * c for b, c in zip(bits, a))  # Python ints: no overflow, no rounding
    assert torch.equal(row_hash(rows.to(torch.bfloat16)), h)  # bf16 rows hash as their fp32 values


@pytest.mark.parametrize("scheme,static_w4", [("fp8_dynamic", False), ("fp8_static", False), ("w4a8", True),
                                              ("w4a8_dynamic", False)])
def test_preflight_knows_every_scheme_preset(scheme, static_w4):
    """The eval preflight reads the scheme from its config (fp8_dynamic is defined by its YAML alone)."""
    from slim.eval_checks import _scored_layout

    assert _scored_layout(compose_config(f"scheme={scheme}"))[0] is static_w4


def test_histogram_bins_are_ordered_exact_edges():
    from slim.quant.observers import bin_upper_edge, histogram_bins

    a = torch.tensor([0.0, 1e-30, 0.5, 1.0, 1.0 + 1 / 32 - 2**-23, 1.0 + 1 / 32, 3.0, 448.0, float("inf")])
    b = histogram_bins(a)
    assert (b[1:] >= b[:-1]).all() and b[0] == 0
    assert b[4] == b[3] and b[5] == b[3] + 1  # [1, 1 + 1/32) is one bin
    assert bin_upper_edge(int(b[3])) == 1.0 + 1 / 32
    assert all(bin_upper_edge(int(i)) > v for i, v in zip(b[:-1], a[:-1].tolist()))
    assert torch.equal(histogram_bins(-a), b)  # |x|
