"""AWQ (slim.algorithms.awq) on the embedded model's layers: smoothing preserves each layer's function and the MoE
routing, the chosen scales are never worse than none on the search rows, what is written is the smoothed tensor,
and the numerics follow llm-compressor's AWQModifier (vllm-project/llm-compressor,
src/llmcompressor/modifiers/transform/awq/base.py: _get_grid_search_params, _compute_best_scale,
_compute_layer_means)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from slim.algorithms import ALGORITHMS, Composed, LayerContext
from slim.algorithms.awq import AWQ, awq_scales, fake_quantize, grid_points, weight_mean
from slim.algorithms.awq_mappings import MAPPINGS, resolve
from slim.algorithms.rtn import RoundToNearest
from slim.calibration.runner import LayerRunner
from slim.distributed import Dist
from slim.layer_loop import take_samples
from slim.quant.schemes import SCHEMES, Scheme
from slim.quantize import LayerQuantizer, QuantizeResult
from slim.targets import select_targets
from tests.helpers.configs import compose_config

W4_ALL = Scheme("w4a8", SCHEMES["w4a8"].weights, SCHEMES["w4a8"].input_activations)  # group size 128


def _load(path, dtype, load_type="fp8"):
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.checkpoint import CheckpointReader
    from slim.models.materialize import materialize

    reader = CheckpointReader(path, load_type=load_type)
    model, adapter = build_skeleton(load_config(str(path)), dtype)
    adapter.open_reader(reader, model.config)
    materialize(model, "", reader)
    return model, adapter, reader


@pytest.fixture(scope="module")
def embedded(embedded_model_path):
    return _embedded(embedded_model_path, torch.float32)


def _embedded(embedded_model_path, dtype, load_type="fp8", tokenizer=None):
    """The embedded model (or another), materialized, and each decoder layer's calibration inputs (8 samples x 64
    tokens of the shipped calibration text)."""
    from transformers import AutoTokenizer

    from slim.calibration.data import calibration_tokens

    model, adapter, reader = _load(embedded_model_path, dtype, load_type)
    tok = AutoTokenizer.from_pretrained(str(tokenizer or embedded_model_path))
    cal = compose_config("calibration.num_samples=8", "calibration.seq_len=64").calibration
    ids = calibration_tokens(cal, tok, 1024)
    runner = LayerRunner(model, torch.device("cpu"))
    hidden = [runner.embed(ids, 4)]
    for i, layer in enumerate(model.model.layers[:-1]):
        hidden.append(runner.forward(layer, hidden[-1], str(i)))
    return model, adapter, reader, runner, hidden


def _ctx(embedded, i, ignore=("lm_head",), scheme=W4_ALL, dist=None, **settings):
    model, adapter, _, runner, hidden = embedded
    layer = copy.deepcopy(model.model.layers[i])
    prefix = f"model.layers.{i}."
    names = {n for n in select_targets(model, list(ignore)).targets if n.startswith(prefix)}
    targets = {prefix + n: m for n, m in layer.named_modules() if prefix + n in names}
    # a shorter grid and fewer search rows than the defaults: the same code, in unit-test time
    settings = {"grid": 6, "search_samples": 4, **settings}
    cfg = compose_config("algorithm=awq", *(f"algorithm.{k}={v}" for k, v in settings.items())).algorithm

    def run(samples=slice(None)):
        return runner.forward(layer, take_samples(hidden[i], samples), str(i))

    return LayerContext(layer=layer, prefix=prefix, targets=targets, run=run, scheme=scheme,
                        group_size=128 if scheme.per_group else None, weight_observer="minmax",
                        group_scale_dtype=torch.bfloat16 if scheme.per_group else None, dist=dist or Dist(),
                        adapter_name=adapter.name, settings=cfg, store_device=torch.device("cpu"))


def _rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    a, b = torch.cat(a).float(), torch.cat(b).float()
    return ((a - b).norm() / b.norm()).item()


# ---- numerics against the reference's definitions ------------------------------------------------------------
def test_grid_points_as_the_reference():
    duo = grid_points(20, True)
    assert len(duo) == 20 and duo[0] == (0.0, False) and duo[1] == (0.0, True) and duo[-1] == (1.0, True)
    assert grid_points(20, False) == [(i / 19, False) for i in range(20)]
    both = grid_points(20, "both")
    assert len(both) == 20 and both[:2] == [(0.0, False), (0.0, True)]


def test_scales_formula_and_normalisation():
    torch.manual_seed(0)
    x, w = torch.rand(64) + 0.01, torch.rand(64) + 0.01
    s = awq_scales(x, w, 0.3, True)
    ref = (x.pow(0.3) / (w.pow(0.7) + 1e-4)).clamp(min=1e-4)
    ref = ref / (ref.max() * ref.min()).sqrt()
    assert torch.allclose(s, ref) and torch.allclose(s.max() * s.min(), torch.tensor(1.0))
    assert torch.equal(awq_scales(x, w, 0.0, False), torch.ones(64))  # the grid's first point: no smoothing
    p2 = awq_scales(x, w, 0.3, True, power_of_two=True)
    assert torch.equal(p2, torch.exp2(torch.log2(p2).round())) and ((p2 / s).log2().abs() <= 0.5 + 1e-6).all()


def test_weight_mean_normalises_per_group():
    w = torch.tensor([[1.0, -2.0, 4.0, 8.0], [3.0, 3.0, -6.0, 6.0]])
    got = weight_mean([w], group_size=2)
    assert torch.allclose(got, torch.tensor([(0.5 + 1.0) / 2, (1.0 + 1.0) / 2, (0.5 + 1.0) / 2, (1.0 + 1.0) / 2]),
                          atol=1e-5)


def test_fake_quantize_is_the_schemes_round_trip():
    from slim.quant.schemes import dequantize_weight

    torch.manual_seed(0)
    w = torch.randn(16, 256)

    class C:
        scheme, group_size, weight_observer, group_scale_dtype = W4_ALL, 128, "minmax", torch.bfloat16

    q = W4_ALL.quantize(w, torch.tensor(1.0), 128, "minmax", torch.bfloat16)
    assert torch.equal(fake_quantize(C, w), dequantize_weight(q))


# ---- the embedded model's layers ---------------------------------------------------------------------------------
def test_mappings_resolve_on_deepseek_layers(embedded):
    model = embedded[0]
    dense, moe = (resolve(model.model.layers[i], MAPPINGS["deepseek_v3"]) for i in (0, 1))
    names = lambda kinds: [[r.smooth_name for r in k] for k in kinds]  # noqa: E731
    assert names(dense) == [["input_layernorm"], ["self_attn.q_a_layernorm"], ["self_attn.kv_a_layernorm"],
                            ["post_attention_layernorm"], ["mlp.up_proj"]]
    norm = moe[3][0]
    assert norm.parent_name == "mlp" and list(norm.balance)[0] == "mlp.gate"  # the router hooks the statistics
    assert len(norm.balance) == 1 + 2 * 16 + 2  # router, routed experts' gate/up, the shared expert's gate/up
    assert [r.parent_name for r in moe[4]] == [f"mlp.experts.{e}.down_proj" for e in range(16)] + \
        ["mlp.shared_experts.down_proj"]
    assert moe[0][0].parent_name == "self_attn" and moe[2][0].parent_name == "self_attn.kv_b_proj"


def _routes(ctx):
    """The router's (logits, top-k weights, top-k indices) per calibration batch."""
    out = []
    h = ctx.layer.mlp.gate.register_forward_hook(lambda _m, _a, o: out.append(o))
    ctx.run()
    h.remove()
    return out


@pytest.mark.parametrize("i", [0, 1], ids=["dense", "moe"])
def test_smoothing_preserves_the_layer_and_routing(embedded, i):
    """Every Linear quantized (W4 g128), fp32: the layer's output after folding equals the one before to ~1e-5,
    the router's top-k choices on the calibration set are identical and its weights equal to fp tolerance."""
    ctx = _ctx(embedded, i)
    layer = ctx.layer
    before = ctx.run()
    routes = _routes(ctx) if i else []
    norm_before = layer.post_attention_layernorm.weight.clone()
    awq = AWQ()
    changed = awq.prepare(ctx)
    after = ctx.run()
    assert _rel(after, before) < 1e-5
    assert not torch.equal(layer.post_attention_layernorm.weight, norm_before)  # it did smooth
    assert any(r["ratio"] > 0 for r in awq.records)
    assert f"{ctx.prefix}input_layernorm.weight" in changed
    if i:
        assert f"{ctx.prefix}mlp.gate.weight" in changed and f"{ctx.prefix}mlp.experts.7.up_proj.weight" in changed
        smoothed = _routes(ctx)
        assert len(smoothed) == len(routes) > 0
        for (_, w0, i0), (_, w1, i1) in zip(routes, smoothed):
            order0, order1 = i0.sort(-1), i1.sort(-1)
            assert torch.equal(order0.values, order1.values)  # the same experts for every token
            assert torch.allclose(w0.gather(1, order0.indices), w1.gather(1, order1.indices), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def embedded_bf16(embedded_model_path):
    return _embedded(embedded_model_path, torch.bfloat16)


def test_power_of_two_scales_fold_exactly_in_bf16(embedded_bf16):
    """algorithm.pow2_scales: multiplying and dividing by powers of two rounds exactly, so the bf16 layer computes
    bit for bit what it did, and routes every token as before. Every mapping of the MoE layer is folded with
    power-of-two scales spanning 1/16..16 (what the search may choose; it may as well choose none on this model)."""
    ctx = _ctx(embedded_bf16, 1, pow2_scales=True)
    before, routes = ctx.run(), _routes(ctx)
    gen = torch.Generator().manual_seed(0)
    changed = set()
    for kind in resolve(ctx.layer, MAPPINGS["deepseek_v3"]):
        for r in kind:
            width = next(iter(r.balance.values())).weight.shape[1]
            x_mean = torch.rand(width, generator=gen) * 50 + 0.1
            s = awq_scales(x_mean, None, 1.0, False, power_of_two=True)
            assert s.max() / s.min() >= 8
            AWQ._fold(ctx, r, s, changed)
    assert f"{ctx.prefix}mlp.gate.weight" in changed
    assert all(torch.equal(a, b) for a, b in zip(ctx.run(), before))
    assert all(torch.equal(a[2], b[2]) and torch.equal(a[1], b[1]) for a, b in zip(_routes(ctx), routes))


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "qwen3_moe"])
def test_other_families_smooth_preserving_the_layer(family, tmp_path, embedded_model_path):
    """Llama-style (v_proj -> o_proj only without grouped-query attention) and Qwen3-MoE (router + experts):
    random small models saved by transformers, fp32, every Linear but lm_head quantized."""
    if family == "qwen3_moe":
        from tests.integration.test_qwen3_moe import save_qwen3_moe

        save_qwen3_moe(tmp_path / "m", embedded_model_path)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2 if family == "llama_gqa" else 4,
                                     max_position_embeddings=512)).save_pretrained(tmp_path / "m")
    loaded = _embedded(tmp_path / "m", torch.float32, "bf16", tokenizer=embedded_model_path)
    ctx = _ctx(loaded, 0)
    kinds = resolve(ctx.layer, MAPPINGS[ctx.adapter_name])
    smooth = {r.smooth_name for k in kinds for r in k}
    assert ("self_attn.v_proj" in smooth) == (family == "llama")
    before = ctx.run()
    routes = _routes(ctx) if family == "qwen3_moe" else []
    changed = AWQ().prepare(ctx)
    assert _rel(ctx.run(), before) < 1e-5
    assert f"{ctx.prefix}post_attention_layernorm.weight" in changed
    if family == "qwen3_moe":
        assert f"{ctx.prefix}mlp.gate.weight" in changed
        for (_, w0, i0), (_, w1, i1) in zip(routes, _routes(ctx)):
            assert torch.equal(i0, i1) and torch.allclose(w0, w1, rtol=1e-5, atol=1e-6)


def test_chosen_scales_never_worse_than_none_on_the_search_rows(embedded):
    """Per mapping the search's own objective, and independently for kv_b_proj: the quantized output error of the
    smoothed weights on the smoothed inputs vs that of the unsmoothed weights on the original inputs."""
    ctx = _ctx(embedded, 1)
    kv_b = ctx.layer.self_attn.kv_b_proj
    seen = []
    h = kv_b.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    ctx.run()
    h.remove()
    w0 = kv_b.weight.detach().clone()
    x0 = torch.cat(seen)
    ref = x0 @ w0.T
    err_none = (x0 @ fake_quantize(ctx, w0).T - ref).pow(2).mean()
    awq = AWQ()
    awq.prepare(ctx)
    assert all(r["error_after"] <= r["error_before"] for r in awq.records)
    assert sum(r["error_after"] < r["error_before"] for r in awq.records) > len(awq.records) // 2
    seen.clear()
    h = kv_b.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().clone()))
    ctx.run()
    h.remove()
    x1 = torch.cat(seen)
    err_awq = (x1 @ fake_quantize(ctx, kv_b.weight.detach()).T - ref).pow(2).mean()
    assert err_awq < err_none, (err_awq, err_none)


def test_reference_ignore_list_smooths_only_what_feeds_quantized_experts(embedded):
    """scheme=w4a8's ignore list (only routed experts W4): the attention and the shared expert's up->down mapping
    have no quantized balance Linear and are left alone; the MoE norm is folded into the router, every routed expert
    and the (unquantized) shared expert."""
    ignore = compose_config("scheme=w4a8").scheme.ignore_layers
    ctx = _ctx(embedded, 1, ignore=ignore)
    attn_norm = ctx.layer.input_layernorm.weight.clone()
    changed = AWQ().prepare(ctx)
    p = ctx.prefix
    assert torch.equal(ctx.layer.input_layernorm.weight, attn_norm)
    assert not any(".self_attn." in n or "input_layernorm" in n for n in changed)
    assert {f"{p}post_attention_layernorm.weight", f"{p}mlp.gate.weight", f"{p}mlp.shared_experts.gate_proj.weight",
            f"{p}mlp.shared_experts.up_proj.weight", f"{p}mlp.experts.3.up_proj.weight"} <= changed
    assert f"{p}mlp.shared_experts.down_proj.weight" not in changed  # its up->down mapping: nothing quantized
    assert AWQ().prepare(_ctx(embedded, 0, ignore=ignore)) == set()  # dense layer: nothing quantized at all


def test_search_samples_limits_the_search_rows(embedded):
    ctx = _ctx(embedded, 0, search_samples=2, grid=4)
    calls = []
    run = ctx.run
    ctx.run = lambda samples=slice(None): calls.append(samples) or run(samples)
    AWQ().prepare(ctx)
    assert calls == [slice(0, 2), slice(2, None)]


class _Writer:
    def __init__(self):
        self.out = {}

    def add(self, name, tensor):
        self.out[name] = tensor.clone()

    def add_all(self, tensors):
        for k, v in tensors.items():
            self.add(k, v)


@pytest.mark.parametrize("fmt_name", ["compressed-tensors", "w4afp8"])
def test_written_unquantized_tensors_are_the_smoothed_ones(embedded, fmt_name):
    """write_rest: a smoothed tensor is written from memory (source dtype; block-FP8 sources in the model dtype,
    or, for w4afp8, block FP8 quantized again from the smoothed values), an untouched one from the source."""
    from slim.formats import FORMATS
    from slim.quant.fp8 import FP8_DTYPE

    reader = embedded[2]
    ignore = compose_config("scheme=w4a8").scheme.ignore_layers
    ctx = _ctx(embedded, 1, ignore=ignore)
    changed = AWQ().prepare(ctx)
    writer = _Writer()
    lq = LayerQuantizer(W4_ALL, FORMATS[fmt_name], writer, reader, 128, "minmax", QuantizeResult(), set())
    lq.write_rest(ctx.layer, ctx.prefix, set(ctx.targets), changed)
    state = ctx.layer.state_dict()
    p = ctx.prefix
    norm = f"{p}post_attention_layernorm.weight"
    assert reader.raw(norm).dtype == torch.bfloat16 and writer.out[norm].dtype == torch.bfloat16
    assert torch.equal(writer.out[norm], state["post_attention_layernorm.weight"].to(torch.bfloat16))
    router = f"{p}mlp.gate.weight"
    assert torch.equal(writer.out[router], state["mlp.gate.weight"].to(reader.raw(router).dtype))
    shared = f"{p}mlp.shared_experts.up_proj.weight"
    assert reader.raw(shared).dtype == FP8_DTYPE
    if fmt_name == "compressed-tensors":
        assert torch.equal(writer.out[shared], state["mlp.shared_experts.up_proj.weight"])
    else:  # block FP8 again, from the smoothed values: not the source's codes, and within FP8's rounding of them
        from slim.models.checkpoint import BLOCK_SCALE_SUFFIX
        from slim.quant.fp8 import dequantize_fp8_block

        assert writer.out[shared].dtype == FP8_DTYPE
        assert not torch.equal(writer.out[shared].view(torch.uint8), reader.raw(shared).view(torch.uint8))
        back = dequantize_fp8_block(writer.out[shared], writer.out[shared + BLOCK_SCALE_SUFFIX], (128, 128),
                                    torch.float32)
        smoothed = state["mlp.shared_experts.up_proj.weight"].float()
        assert ((back - smoothed).norm() / smoothed.norm()) < 0.05
    untouched = f"{p}self_attn.o_proj.weight"
    assert untouched not in changed
    if fmt_name == "compressed-tensors":  # from the source: dequantized block FP8, as without AWQ
        assert torch.equal(writer.out[untouched], state["self_attn.o_proj.weight"])
    else:
        assert torch.equal(writer.out[untouched].view(torch.uint8), reader.raw(untouched).view(torch.uint8))


# ---- composition -------------------------------------------------------------------------------------------------
def test_composed_prepares_with_the_first_and_quantizes_with_the_second(embedded):
    algo = Composed("awq_rtn", AWQ, RoundToNearest)
    ctx = _ctx(embedded, 0)
    before = ctx.layer.input_layernorm.weight.clone()
    assert algo.prepare(ctx) and not torch.equal(ctx.layer.input_layernorm.weight, before)
    assert algo.first.records and isinstance(algo.second, RoundToNearest)
    # no codes from either; the smoothed targets carry AWQ's search result for modules.json, once
    said = algo.apply(ctx.targets, {})
    balanced = {f"{ctx.prefix}{b}" for r in algo.first.records for b in r["balance_names"]} & set(ctx.targets)
    assert balanced and set(said) == balanced
    for name, s in said.items():
        assert s.weight is None and s.algorithm == "awq", name
        assert s.reason.startswith("awq: scales from ") and "output error" in s.reason, s.reason
    assert algo.apply(ctx.targets, {}) == {}


def test_awq_gptq_is_awq_then_gptq():
    from slim.algorithms import build_algorithm
    from slim.algorithms.gptq import GPTQ
    from slim.config import validate
    from slim.quant.schemes import scheme_from_config

    cfg = validate(compose_config("algorithm=awq_gptq", "scheme=w4a8"))
    algo = build_algorithm(cfg, scheme_from_config(cfg.scheme), fmt=None)
    assert algo.name == "awq_gptq" and isinstance(algo.first, AWQ) and isinstance(algo.second, GPTQ)
    assert algo.collect.__func__ is Composed.collect and algo.apply.__func__ is Composed.apply
    assert algo.second.ctx.cfg.dampening_frac == 0.01 and algo.first  # GPTQ's settings reach the composed one


def test_awq_config_validation():
    from slim.config import validate
    from slim.errors import SlimError

    with pytest.raises(SlimError, match="calibration=embedded"):
        validate(compose_config("algorithm=awq", "scheme=w4a8_dynamic", "calibration=none"))
    with pytest.raises(SlimError, match="algorithm.grid"):
        validate(compose_config("algorithm=awq", "algorithm.grid=2"))
    with pytest.raises(SlimError, match="duo_scaling"):
        validate(compose_config("algorithm=awq", "algorithm.duo_scaling=maybe"))
    assert validate(compose_config("algorithm=awq")).algorithm.grid == 20


def test_rtn_prepare_changes_nothing():
    assert RoundToNearest().prepare(None) == set()


def test_linear_bias_is_divided_too():
    """A Linear smooth module (v_proj -> o_proj, up -> down): rows and bias divided by s."""
    smooth, bal = nn.Linear(4, 3), nn.Linear(3, 2)
    x = torch.randn(5, 4)
    y = bal(smooth(x))

    class R:
        smooth_name, balance = "s", {"b": bal}

    R.smooth = smooth

    class C:
        prefix = "p."

    changed = set()
    AWQ._fold(C, R, torch.tensor([2.0, 0.5, 3.0]), changed)
    assert torch.allclose(bal(smooth(x)), y, atol=1e-6) and changed == {"p.b.weight", "p.s.weight", "p.s.bias"}


def test_every_algorithm_has_every_step_of_the_layer_loop():
    """The layer loop calls prepare, collect and apply on whatever algorithm the config names."""
    from slim.algorithms import ALGORITHMS, build_algorithm
    from slim.config import validate
    from slim.quant.schemes import scheme_from_config

    for name in ALGORITHMS:
        cfg = validate(compose_config(f"algorithm={name}", "scheme=w4a8"))
        algo = build_algorithm(cfg, scheme_from_config(cfg.scheme), fmt=None)
        assert algo.name == name
        assert all(callable(getattr(algo, step, None)) for step in ("prepare", "collect", "apply")), name
