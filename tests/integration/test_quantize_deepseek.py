"""End to end on DeepSeek-V3-architecture checkpoints: streaming calibration, fp8_static export, read back."""

import json

import pytest
import torch
from torch import nn

from slim.calibration.data import calibration_tokens
from slim.models.adapters import build_skeleton, load_config
from slim.models.checkpoint import CheckpointReader
from slim.models.loading import load_model, materialize_rest
from slim.models.simulated import SimQuantLinear
from slim.pipeline import quantize_stage
from slim.quant.fp8 import FP8_DTYPE, fp8_scale, quantize_fp8
from tests.helpers.checkpoints import read_all
from tests.helpers.configs import compose_config


def run_quantize(src, out, *overrides):
    cfg = compose_config(f"model.path={src}", "eval=none", "logger=none", "calibration.num_samples=8",
                         "calibration.seq_len=64", *overrides)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(src))
    return cfg, quantize_stage(cfg, src, out, tok), tok



def full_model_input_amax(src, ids):
    """Reference: the whole model in memory, one forward, hooks on every Linear (no streaming)."""
    model, _ = build_skeleton(load_config(str(src)), torch.bfloat16)
    materialize_rest(model, CheckpointReader(src, load_type="fp8"), "cpu")
    amax = {}

    def hook(name):
        def fn(_m, args):
            if args[0].numel():
                amax[name] = max(amax.get(name, 0.0), args[0].abs().amax().float().item())
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(hook(name))
    with torch.no_grad():
        for chunk in ids.split(8):
            model(chunk)
    return amax


def test_fp8_static_checkpoint_is_the_definition(random_deepseek, tmp_path):
    cfg, res, tok = run_quantize(random_deepseek, tmp_path / "ckpt")
    tensors = read_all(tmp_path / "ckpt")
    reader = CheckpointReader(random_deepseek, load_type="fp8")
    ids = calibration_tokens(cfg.calibration, tok)
    ref_amax = full_model_input_amax(random_deepseek, ids)
    quantized = [m["name"] for m in res["modules"]]
    assert "lm_head" not in quantized and "lm_head.weight" in tensors
    assert any(".experts.7.down_proj" in n for n in quantized)  # every routed expert its own scales
    for name in quantized:
        w = reader.get(name + ".weight", torch.bfloat16)  # what the model computes with
        scale = fp8_scale(w.float().abs().amax().reshape(1))
        assert torch.equal(tensors[name + ".weight_scale"], scale), name
        assert torch.equal(tensors[name + ".weight"].view(torch.uint8), quantize_fp8(w, scale).view(torch.uint8)), name
        # layer-by-layer streaming observes exactly what a whole-model forward sees
        assert torch.equal(tensors[name + ".input_scale"], fp8_scale(torch.tensor([ref_amax[name]]))), name
    # unquantized tensors are passed through bit-exactly
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"):
        assert torch.equal(tensors[name], reader.raw(name))
    assert not any(n.endswith("_scale_inv") for n in tensors)
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["slim"]["scheme"] == "fp8_static" and config["slim"]["fallback_input_scales"] == []


def test_exported_checkpoint_loads_back_exactly(random_deepseek, tmp_path):
    run_quantize(random_deepseek, tmp_path / "ckpt")
    tensors = read_all(tmp_path / "ckpt")
    model = load_model(str(tmp_path / "ckpt"))
    sims = {n: m for n, m in model.named_modules() if isinstance(m, SimQuantLinear)}
    assert len(sims) == sum(n.endswith(".input_scale") for n in tensors)
    for name, m in sims.items():
        assert m.q.weight.dtype == FP8_DTYPE
        assert torch.equal(m.q.weight.view(torch.uint8), tensors[name + ".weight"].view(torch.uint8))
        assert torch.equal(m.q.input_scale, tensors[name + ".input_scale"])
    with torch.no_grad():
        logits = model(torch.arange(32).unsqueeze(0)).logits
    assert torch.isfinite(logits).all()


def test_expert_without_tokens_gets_layer_max_fallback(random_deepseek_dead_expert, tmp_path):
    _, res, _ = run_quantize(random_deepseek_dead_expert, tmp_path / "ckpt")
    mods = {m["name"]: m for m in res["modules"]}
    dead = "model.layers.1.mlp.experts.3.gate_proj"
    assert mods[dead]["tokens"] == 0 and mods[dead]["fallback"]
    peers = [m["input_amax"] for n, m in mods.items() if ".experts." in n and n.endswith("gate_proj") and n != dead]
    assert mods[dead]["input_amax"] == max(peers)
    assert mods[dead]["input_scale"] not in (0.0, 1.0)
    assert sorted(res["fallbacks"]) == sorted(f"model.layers.1.mlp.experts.3.{p}" for p in ("down_proj", "gate_proj", "up_proj"))


def test_route_all_experts_observes_every_expert_without_changing_outputs(random_deepseek_dead_expert, tmp_path):
    _, res, _ = run_quantize(random_deepseek_dead_expert, tmp_path / "a", "calibration.route_all_experts=true")
    _, base, _ = run_quantize(random_deepseek_dead_expert, tmp_path / "b")
    assert res["fallbacks"] == []
    mods = {m["name"]: m for m in res["modules"]}
    assert mods["model.layers.1.mlp.experts.3.gate_proj"]["tokens"] == 8 * 64
    # Non-expert modules see identical inputs: routing everything does not change the layer outputs.
    b = {m["name"]: m for m in base["modules"]}
    assert mods["model.layers.1.mlp.shared_experts.down_proj"]["input_amax"] == b["model.layers.1.mlp.shared_experts.down_proj"]["input_amax"]


def test_bf16_load_type_matches_fp8_load_type(random_deepseek, tmp_path):
    from slim.models.convert import convert_fp8_to_bf16

    bf16 = convert_fp8_to_bf16(random_deepseek, tmp_path / "bf16")
    assert not CheckpointReader(bf16).is_block_fp8
    run_quantize(random_deepseek, tmp_path / "from_fp8")
    run_quantize(bf16, tmp_path / "from_bf16", "model.load_type=bf16")
    a, b = read_all(tmp_path / "from_fp8"), read_all(tmp_path / "from_bf16")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].view(torch.uint8) if a[k].dtype == FP8_DTYPE else a[k],
                           b[k].view(torch.uint8) if b[k].dtype == FP8_DTYPE else b[k]), k


def test_fp8_native_format_holds_the_same_values(random_deepseek, tmp_path):
    run_quantize(random_deepseek, tmp_path / "ct")
    run_quantize(random_deepseek, tmp_path / "native", "scheme.format=fp8_native")
    config = json.loads((tmp_path / "native" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "fp8" and config["activation_scheme"] == "static"
    assert "lm_head" in config["ignored_layers"]
    a, b = load_model(str(tmp_path / "ct")), load_model(str(tmp_path / "native"))
    sa = {n: m for n, m in a.named_modules() if isinstance(m, SimQuantLinear)}
    sb = {n: m for n, m in b.named_modules() if isinstance(m, SimQuantLinear)}
    assert sa.keys() == sb.keys() and sa
    for n in sa:
        assert torch.equal(sa[n].q.weight.view(torch.uint8), sb[n].q.weight.view(torch.uint8))
        assert torch.equal(sa[n].q.weight_scale.reshape(1), sb[n].q.weight_scale.reshape(1))
        assert torch.equal(sa[n].q.input_scale.reshape(1), sb[n].q.input_scale.reshape(1))


def test_group_size_that_divides_nothing_names_the_layer(random_deepseek, tmp_path):
    from slim.errors import SlimError

    with pytest.raises(SlimError, match=r"group_size 96 does not divide in_features 256 of model\.layers\.1\.mlp\.experts"):
        run_quantize(random_deepseek, tmp_path / "ckpt", "scheme=w4a8", "scheme.group_size=96")
    assert not (tmp_path / "ckpt" / "config.json").exists()


@pytest.mark.parametrize("scheme", ["w4a8", "w4a8_dynamic"])
def test_w4a8_checkpoint_reads_back_the_codes_it_wrote(random_deepseek, tmp_path, scheme):
    from slim.quant.schemes import SCHEMES

    _, res, _ = run_quantize(random_deepseek, tmp_path / "ckpt", f"scheme={scheme}")
    model = load_model(str(tmp_path / "ckpt"))
    reader = CheckpointReader(random_deepseek, load_type="fp8")
    sims = {n: m for n, m in model.named_modules() if isinstance(m, SimQuantLinear)}
    assert set(sims) == {m["name"] for m in res["modules"]} and all(".experts." in n for n in sims)
    for name, sim in sims.items():
        amax = None if sim.q.input_scale is None else sim.q.input_scale * 448
        expected = SCHEMES[scheme].quantize(reader.get(name + ".weight", torch.bfloat16), amax, 128,
                                            group_scale_dtype=torch.bfloat16)
        assert torch.equal(sim.q.weight, expected.weight), name
        assert torch.equal(sim.q.weight_scale.float(), expected.weight_scale.float()), name
        assert (sim.q.input_scale is None) == (scheme == "w4a8_dynamic")


@pytest.mark.parametrize("copy", [False, True])
def test_mtp_layer_is_skipped_or_copied_through(tmp_path, embedded_model_path, copy):
    from tests.helpers.checkpoints import add_mtp_layer, write_random_deepseek

    src = write_random_deepseek(tmp_path / "src", embedded_model_path)
    mtp_names = add_mtp_layer(src)
    _, res, _ = run_quantize(src, tmp_path / "ckpt", f"model.copy_mtp={str(copy).lower()}")
    tensors = read_all(tmp_path / "ckpt")
    written = [n for n in tensors if n.startswith("model.layers.2.")]
    if copy:
        assert sorted(written) == [n for n in mtp_names if not n.endswith("_scale_inv")]
        assert tensors["model.layers.2.self_attn.q_a_proj.weight"].dtype == torch.bfloat16  # dequantized
        assert res["skipped_prefixes"] == []
    else:
        assert written == [] and res["skipped_prefixes"] == ["model.layers.2."]
    assert not any(m["name"].startswith("model.layers.2.") for m in res["modules"])  # never quantized
