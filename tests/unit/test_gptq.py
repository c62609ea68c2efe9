"""GPTQ numerics (slim.quant.gptq) against definitions and a plain reference written here; the algorithm's
Hessian collection, fallbacks and expert chunks (slim.algorithms.gptq) on small Linears."""

import types

import pytest
import torch
from torch import nn

from slim.algorithms import AlgorithmContext
from slim.algorithms.gptq import GPTQ
from slim.config import AlgorithmConfig
from slim.quant import gptq as solver
from slim.quant import int4
from slim.quant.observers import WEIGHT_OBSERVERS
from slim.quant.schemes import SCHEMES, dequantize_weight
from slim.quant.types import QuantizedLinear

W4 = SCHEMES["w4a8_dynamic"]  # the weight numerics of w4a8 (no input amax needed here)
FP8 = SCHEMES["fp8_static"]
ONE = torch.ones(())  # an input amax, for the static-activation scheme's quantize


def group_scale_fn(group_size, scale_dtype=torch.bfloat16):
    return lambda g: W4.handler.quantize(g, WEIGHT_OBSERVERS["minmax"], group_size, scale_dtype, None)[1].reshape(-1)


def correlated(n, cols, seed=0):
    """Inputs whose channels are strongly correlated (a random mixing of few latent factors plus noise)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, cols // 4, generator=gen)
    x = z @ torch.randn(cols // 4, cols, generator=gen) + 0.1 * torch.randn(n, cols, generator=gen)
    return x * torch.rand(cols, generator=gen) * 3  # uneven channel magnitudes


def solve_int4(w, h, group_size=32, block_size=64, dampening=0.01):
    """w [R, C], h [C, C] -> (codes, bf16 scales) with slim's rule."""
    weight = w.clone()[None]
    hinv, ok, _ = solver.inverse_hessian_factor(h.clone()[None], weight, dampening)
    assert bool(ok.all())
    codes, scales = solver.gptq_solve(weight, hinv, solver.int4_grid(group_size), block_size=block_size,
                                      group_scale=group_scale_fn(group_size))
    return codes[0], scales[0]


def reference_gptq(w, h, group_size, dampening=0.01):
    """A plain GPTQ written from the paper: no lazy blocks, the full inverse Hessian updated column by column
    (Frantar et al. 2022, eq. 3: w_F -= (w_q - quant(w_q)) / [H_F^-1]_qq * (H_F^-1)_:,q, then H_F^-1 loses q),
    group scales from the current weights at each group's first column, slim's int4 rule."""
    w = w.double().clone()
    h = h.double().clone()
    h += torch.eye(h.shape[0], dtype=h.dtype) * dampening * h.diagonal().mean()
    hinv = torch.linalg.inv(h)
    cols = w.shape[1]
    codes = torch.empty(w.shape, dtype=torch.int8)
    scales = torch.empty(w.shape[0], cols // group_size, dtype=torch.bfloat16)
    for q in range(cols):
        if q % group_size == 0:
            s = group_scale_fn(group_size)(w[:, q : q + group_size].float())
            scales[:, q // group_size] = s
        c = torch.div(w[:, q].float(), s.float()).round().clamp(-8, 7)
        codes[:, q] = c.to(torch.int8)
        err = (w[:, q] - c.double() * s.double()) / hinv[q, q]
        w[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv = hinv - hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]  # remove q (Gaussian elimination)
    return codes, scales


def test_identity_hessian_is_rtn_bit_for_bit():
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(48, 256, generator=gen).to(torch.bfloat16).float()
    codes, scales = solve_int4(w, torch.eye(256), group_size=64, block_size=128)
    rtn = W4.quantize(w, None, 64, "minmax", torch.bfloat16)
    assert torch.equal(codes, rtn.weight) and torch.equal(scales, rtn.weight_scale)
    assert scales.dtype == torch.bfloat16
    # group size larger than the block: groups start at block starts
    codes, scales = solve_int4(w, torch.eye(256), group_size=128, block_size=32)
    rtn = W4.quantize(w, None, 128, "minmax", torch.bfloat16)
    assert torch.equal(codes, rtn.weight) and torch.equal(scales, rtn.weight_scale)
    # FP8 per tensor, the tensor scale fixed up front
    weight = w.clone()[None]
    hinv, _, _ = solver.inverse_hessian_factor(torch.eye(256)[None], weight, 0.01)
    fp8 = FP8.quantize(w, ONE)
    codes, _ = solver.gptq_solve(weight, hinv, solver.fp8_grid(), scales=fp8.weight_scale.reshape(1, 1))
    assert torch.equal(codes[0].view(torch.uint8), fp8.weight.view(torch.uint8))


def test_objective_drops_on_correlated_inputs():
    x = correlated(2048, 256)
    h = 2 / x.shape[0] * x.T @ x
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    codes, scales = solve_int4(w, h)
    ours = int4.dequantize_int4(codes, scales, 32)
    rtn = W4.quantize(w, None, 32, "minmax", torch.bfloat16)
    before = solver.hessian_objective(w, dequantize_weight(rtn), h)
    after = solver.hessian_objective(w, ours, h)
    assert after < 0.5 * before, (before, after)
    # codes read back bit-exactly: what is written dequantizes to what GPTQ simulated
    q = QuantizedLinear(codes, scales, None, 4, 32)
    assert torch.equal(dequantize_weight(q), ours)


def test_matches_plain_reference_and_group_scales_follow_slims_rule():
    x = correlated(1024, 128, seed=3)
    h = 2 / x.shape[0] * x.T @ x
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(4))
    for block in (16, 64, 128):  # groups inside blocks, and blocks inside groups
        codes, scales = solve_int4(w, h, group_size=32, block_size=block)
        ref_codes, ref_scales = reference_gptq(w, h, 32)
        # lazy block updates and the Cholesky factor equal the plain elimination in exact arithmetic; fp32 vs fp64
        # rounding may move a value sitting on a rounding boundary by one code
        assert (codes != ref_codes).float().mean() < 0.005, block
        assert (scales != ref_scales).float().mean() < 0.02, block
        assert (codes.int() - ref_codes.int()).abs().max() <= 1


def solve_static(w, h, group_size=32, block_size=64):
    """Activation order with static groups, as slim.algorithms.gptq runs it: w [R, C], h [C, C] -> (codes, scales)."""
    weight, hess = w.clone()[None], h.clone()[None]
    perm = solver.activation_order(hess)
    hess, weight = solver.permute_hessian(hess, perm), solver.permute_columns(weight, perm)
    hinv, ok, _ = solver.inverse_hessian_factor(hess, weight, 0.01)
    assert bool(ok.all())
    scales = group_scale_fn(group_size)(w.reshape(-1, group_size)).reshape(1, w.shape[0], -1)
    codes, _ = solver.gptq_solve(weight, hinv, solver.int4_grid(group_size), block_size=block_size, scales=scales,
                                 column_groups=perm // group_size)
    return solver.unpermute_columns(codes, perm)[0], scales[0]


def reference_static(w, h, group_size, dampening=0.01):
    """The plain elimination of ``reference_gptq`` over the columns in decreasing diag(H) order, each coded with
    its group's scale from the original weights (no lazy blocks, fp64)."""
    order = torch.argsort(h.diagonal(), descending=True, stable=True).tolist()
    w = w.double().clone()
    h = h.double().clone()
    h += torch.eye(h.shape[0], dtype=h.dtype) * dampening * h.diagonal().mean()
    hp = h[order][:, order]
    hinv = torch.linalg.inv(hp)
    wp = w[:, order]
    scales = group_scale_fn(group_size)(w.float().reshape(-1, group_size)).reshape(w.shape[0], -1)
    codes = torch.empty(w.shape, dtype=torch.int8)
    for q, col in enumerate(order):
        s = scales[:, col // group_size].double()
        c = torch.div(wp[:, q], s).round().clamp(-8, 7)
        codes[:, col] = c.to(torch.int8)
        err = (wp[:, q] - c * s) / hinv[q, q]
        wp[:, q:] -= err[:, None] * hinv[q, q:][None, :]
        hinv = hinv - hinv[:, q : q + 1] @ hinv[q : q + 1, :] / hinv[q, q]
    return codes, scales


def test_activation_order_matches_plain_reference_and_stores_no_permutation():
    x = correlated(1024, 128, seed=5)
    h = 2 / x.shape[0] * x.T @ x
    assert not torch.equal(solver.activation_order(h[None])[0], torch.arange(128))  # a real permutation
    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(6))
    ref_codes, ref_scales = reference_static(w, h, 32)
    for block in (16, 48, 128):  # any block: the scales are fixed, a group may straddle blocks
        codes, scales = solve_static(w, h, group_size=32, block_size=block)
        assert torch.equal(scales, ref_scales)  # RTN's own scales, in the original column order
        assert (codes != ref_codes).float().mean() < 0.005, block
        assert (codes.int() - ref_codes.int()).abs().max() <= 1
    # the objective is far below round to nearest's, and the codes read back with the contiguous groups
    rtn = W4.quantize(w, None, 32, "minmax", torch.bfloat16)
    assert torch.equal(scales, rtn.weight_scale)
    ours = dequantize_weight(QuantizedLinear(codes, scales, None, 4, 32))
    assert solver.hessian_objective(w, ours, h) < 0.5 * solver.hessian_objective(w, dequantize_weight(rtn), h)


def test_activation_order_with_a_diagonal_hessian_is_rtn_bit_for_bit():
    """No correlation, no error to spread: whatever the order, the codes are round to nearest's."""
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(16, 96, generator=gen).to(torch.bfloat16).float()
    h = torch.diag(torch.rand(96, generator=gen) + 0.1)
    codes, scales = solve_static(w, h, group_size=32, block_size=64)
    rtn = W4.quantize(w, None, 32, "minmax", torch.bfloat16)
    assert torch.equal(codes, rtn.weight) and torch.equal(scales, rtn.weight_scale)


def test_permutations_invert_fp8_codes_included():
    gen = torch.Generator().manual_seed(8)
    t = torch.randn(2, 3, 10, generator=gen)
    perm = torch.stack([torch.randperm(10, generator=gen) for _ in range(2)])
    assert torch.equal(solver.unpermute_columns(solver.permute_columns(t, perm), perm), t)
    f8 = t.to(torch.float8_e4m3fn)
    back = solver.unpermute_columns(solver.permute_columns(f8.float(), perm).to(torch.float8_e4m3fn), perm)
    assert torch.equal(back.view(torch.uint8), f8.view(torch.uint8))
    h = torch.randn(2, 10, 10, generator=gen)
    assert torch.equal(solver.permute_hessian(h, perm)[1], h[1][perm[1]][:, perm[1]])


def test_dead_columns_and_not_positive_definite():
    w = torch.randn(2, 8, 4)
    h = torch.stack([torch.diag(torch.tensor([1.0, 0.0, 2.0, 3.0])), torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0]))])
    hinv, ok, damp = solver.inverse_hessian_factor(h, w, 0.01, retries=2)
    assert ok.tolist() == [True, False]  # mean(diag) 0: no dampening makes the second one positive definite
    assert damp[1] == pytest.approx(1.0)
    assert (w[0, :, 1] == 0).all()  # dead column: weight zeroed, H diagonal 1 (as llm-compressor does)
    assert torch.isfinite(hinv[0]).all()


class Block(nn.Module):
    """An MLA-like pair sharing an input (q_a, kv_a with q_b between) and two experts with gate/up/down."""

    def __init__(self, d=64, inter=32, experts=2):
        super().__init__()
        self.q_a, self.q_b, self.kv_a = nn.Linear(d, 32, bias=False), nn.Linear(32, d, bias=False), \
            nn.Linear(d, 32, bias=False)
        self.experts = nn.ModuleList(nn.ModuleDict({k: nn.Linear(d if k != "down" else inter, inter if k != "down"
                                                                 else d, bias=False) for k in ("gate", "up", "down")})
                                     for _ in range(experts))

    def targets(self):
        names = {"attn.q_a_proj": self.q_a, "attn.q_b_proj": self.q_b, "attn.kv_a_proj": self.kv_a}
        for e, ex in enumerate(self.experts):
            names |= {f"mlp.experts.{e}.{k}_proj": ex[k] for k in ("gate", "up", "down")}
        return names

    def forward(self, x, expert_tokens):
        self.q_b(self.q_a(x))
        self.kv_a(x)
        for e, ex in enumerate(self.experts):
            t = x[: expert_tokens[e]]
            ex["down"](torch.relu(ex["gate"](t)) * ex["up"](t))


def run_gptq(block, x, expert_tokens, chunk=0, **cfg):
    ctx = AlgorithmContext(cfg=AlgorithmConfig(name="gptq", block_size=32, **cfg), scheme=W4, group_size=32,
                           scale_dtype=torch.bfloat16, expert_chunk=chunk)
    algo = GPTQ(ctx)
    targets = block.targets()
    obs = {n: types.SimpleNamespace(sample=None) for n in targets}
    with torch.no_grad(), algo.collect(targets):
        block(x, expert_tokens)
        groups = dict(algo.group_of)
    return algo.apply(targets, obs, rerun=lambda: block(x, expert_tokens)), groups


def test_shared_inputs_share_one_hessian_and_few_tokens_fall_back():
    torch.manual_seed(0)
    block, x = Block(), torch.randn(200, 64)
    solved, groups = run_gptq(block, x, [100, 5], min_tokens=16)
    assert groups["attn.kv_a_proj"] == groups["attn.q_a_proj"] == "attn.q_a_proj"  # q_b ran between them
    assert groups["attn.q_b_proj"] == "attn.q_b_proj"
    assert groups["mlp.experts.0.up_proj"] == "mlp.experts.0.gate_proj"
    assert groups["mlp.experts.0.down_proj"] == "mlp.experts.0.down_proj"
    assert {n: s.algorithm for n, s in solved.items() if s.algorithm != "gptq"} == {
        f"mlp.experts.1.{k}_proj": "rtn-fallback" for k in ("gate", "up", "down")}
    assert "5 tokens < algorithm.min_tokens 16" in solved["mlp.experts.1.gate_proj"].reason
    # an expert that never ran
    solved, _ = run_gptq(block, x, [100, 0])
    assert solved["mlp.experts.1.down_proj"].reason == "no calibration token"
    s = solved["mlp.experts.0.gate_proj"]
    assert s.weight.dtype == torch.int8 and s.weight_scale.dtype == torch.bfloat16 and s.weight_scale.shape == (32, 2)


def test_actorder_static_and_none_through_the_algorithm():
    """The algorithm's two orders: both far below round to nearest on the layer's own H, scales of static = RTN's,
    and codes that differ (the order changes how errors spread)."""
    torch.manual_seed(0)
    block = Block(experts=1)
    x = correlated(256, 64, seed=9)
    static, _ = run_gptq(block, x, [256])
    none, _ = run_gptq(block, x, [256], actorder="none")
    w = block.experts[0]["gate"].weight.detach()
    h = 2 / x.shape[0] * x.T @ x
    rtn = W4.quantize(w, None, 32, "minmax", torch.bfloat16)
    assert torch.equal(static["mlp.experts.0.gate_proj"].weight_scale, rtn.weight_scale)
    objective = {}
    for name, solved in (("static", static), ("none", none)):
        s = solved["mlp.experts.0.gate_proj"]
        objective[name] = solver.hessian_objective(w, dequantize_weight(QuantizedLinear(s.weight, s.weight_scale,
                                                                                         None, 4, 32)), h)
    assert max(objective.values()) < 0.7 * solver.hessian_objective(w, dequantize_weight(rtn), h), objective
    assert not torch.equal(static["mlp.experts.0.gate_proj"].weight, none["mlp.experts.0.gate_proj"].weight)


def test_expert_chunks_give_the_same_codes():
    torch.manual_seed(0)
    block, x = Block(experts=3), torch.randn(200, 64)
    whole, _ = run_gptq(block, x, [100, 80, 60])
    chunked, _ = run_gptq(block, x, [100, 80, 60], chunk=1)
    assert whole.keys() == chunked.keys()
    for n in whole:
        assert torch.equal(whole[n].weight, chunked[n].weight) and torch.equal(whole[n].weight_scale,
                                                                             chunked[n].weight_scale), n


def test_config_errors_name_the_fix():
    from slim.config import validate
    from slim.errors import SlimError
    from tests.helpers.configs import compose_config

    cfg = compose_config("scheme=w4a8", "algorithm=gptq")
    assert cfg.algorithm.name == "gptq" and cfg.algorithm.block_size == 128 and cfg.algorithm.dampening_frac == 0.01
    for overrides, fix in ((["algorithm.block_size=0"], "algorithm.block_size must be positive"),
                           (["algorithm.dampening_frac=0"], "algorithm.dampening_frac"),
                           (["algorithm.hessian_dtype=float16"], "float32, float64"),
                           (["algorithm.actorder=desc"], "static, none"),
                           (["scheme=w4a8_dynamic", "calibration=none"], "algorithm=rtn")):
        with pytest.raises(SlimError, match=fix):
            validate(compose_config("scheme=w4a8", "algorithm=gptq", *overrides))


def test_a_block_that_does_not_divide_the_group_runs_with_the_group_size():
    from slim.algorithms.gptq import block_for

    assert block_for(128, 192) == 192 and block_for(128, 64) == 128 and block_for(32, 128) == 32
    assert block_for(128, None) == 128  # per-tensor FP8: no groups


def test_wandb_summary_counts_algorithm_fallbacks(tmp_path):
    from slim.config import LoggerConfig
    from slim.tracking import Tracker
    from tests.unit.test_tracking import _records, _rows, _summary

    rows = _rows()
    for r, alg in zip(rows, ("gptq", "rtn-fallback", "gptq", "gptq")):
        r |= {"algorithm": alg, "algorithm_note": "no calibration token" if alg != "gptq" else ""}
    tracker = Tracker(LoggerConfig(name="wandb", mode="offline"), tmp_path, {"logger": {"group": None}}, name="g")
    try:
        tracker.modules(rows)
    finally:
        tracker.finish()
    assert _summary(_records(tmp_path))["modules/algorithm_fallbacks"] == 1
