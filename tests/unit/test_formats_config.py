"""config.json ``quantization_config`` blocks: parsed by compressed-tensors/transformers, served by vLLM.

vLLM is not importable here (no GPU), so its acceptance rules are restated in
``slim.formats.vllm_rules`` (function names and source paths cited there) and exercised below.
"""

from __future__ import annotations

import json

import pytest
from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, preset_name_to_scheme
from transformers.utils.quantization_config import CompressedTensorsConfig

from slim.formats import FORMATS, ROUTER_IGNORE, SCHEMES, detect_format, resolve_scheme
from slim.formats import vllm_rules as vllm

CT = FORMATS["compressed-tensors"]
NATIVE = FORMATS["fp8_native"]
IGNORE = ["lm_head", "model.layers.0.self_attn.o_proj", "lm_head"]
GROUP = {"fp8_static": None, "w4a8": 128, "w4a8_dynamic": 128}
# Fields of QuantizationArgs / QuantizationScheme in compressed-tensors 0.13.0, the version vLLM pins
# (requirements/common.txt); both models are extra="forbid" there, so we may only emit these.
CT_013_ARGS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
               "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
CT_013_SCHEME = {"targets", "weights", "input_activations", "output_activations", "format"}
VLLM_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "dynamic")


def config(scheme: str, **kw) -> dict:
    """A config as it lands in config.json (through JSON)."""
    return json.loads(json.dumps(CT.quantization_config(scheme, IGNORE, GROUP[scheme], **kw)))


def weights_and_inputs(cfg: dict):
    w, a, _ = vllm.scheme_map(cfg)["Linear"]
    return w, a


# ---- compressed-tensors / transformers parse what we write -----------------------------------------
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_compressed_tensors_parses_our_config(scheme):
    cfg = config(scheme)
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.quantization_status == QuantizationStatus.COMPRESSED
    assert parsed.format == ("float-quantized" if scheme == "fp8_static" else "pack-quantized")
    assert parsed.ignore == ["lm_head", "model.layers.0.self_attn.o_proj", ROUTER_IGNORE]
    assert parsed.config_groups["group_0"] == CT.scheme(scheme, GROUP[scheme])
    assert cfg["quant_method"] == "compressed-tensors" and cfg["version"]
    hf = CompressedTensorsConfig.from_dict(dict(cfg))  # what transformers' from_pretrained builds
    assert hf.quantization_config.config_groups["group_0"] == parsed.config_groups["group_0"]


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_config_uses_only_fields_vllm_pinned_compressed_tensors_knows(scheme):
    group = config(scheme)["config_groups"]["group_0"]
    assert set(group) <= CT_013_SCHEME
    for args in (group["weights"], group["input_activations"]):
        assert set(args) <= CT_013_ARGS


@pytest.mark.parametrize("scheme,preset", [("fp8_static", "FP8"), ("w4a8_dynamic", "W4AFP8")])
def test_schemes_equal_the_library_presets(scheme, preset):
    ours, theirs = CT.scheme(scheme, GROUP[scheme]), preset_name_to_scheme(preset, ["Linear"])
    for part in ("weights", "input_activations"):
        a, b = getattr(ours, part), getattr(theirs, part)
        assert [getattr(a, f) for f in VLLM_FIELDS] == [getattr(b, f) for f in VLLM_FIELDS], part


def test_a_weight_only_scheme_has_no_activation_quantization():
    """scheme.input_activations=null: compressed-tensors' W4A16 preset (int4 weights, activations untouched), which
    vLLM serves with its WNA16 path; writing FP8 activations there would quantize what the user left alone."""
    from slim.quant.schemes import Scheme

    w4a8 = SCHEMES["w4a8"]
    ours = CT.scheme(Scheme("w4a16", w4a8.weights, None), 128)
    theirs = preset_name_to_scheme("W4A16", ["Linear"])
    assert ours.input_activations is None and theirs.input_activations is None
    assert [getattr(ours.weights, f) for f in VLLM_FIELDS] == [getattr(theirs.weights, f) for f in VLLM_FIELDS]


def test_scheme_arguments_fail_with_the_fix():
    with pytest.raises(ValueError, match="valid schemes: fp8_static, w4a8, w4a8_dynamic"):
        CT.quantization_config("int4", [], 128)
    with pytest.raises(ValueError, match="needs a positive group_size"):
        CT.quantization_config("w4a8", [])
    with pytest.raises(ValueError, match="pass group_size=None"):
        CT.quantization_config("fp8_static", [], 128)
    with pytest.raises(ValueError, match="dynamic-activation schemes: w4a8_dynamic"):
        resolve_scheme("fp8_static", dynamic_activations=True)
    assert config("w4a8", dynamic_activations=True) == config("w4a8_dynamic")
    assert resolve_scheme("w4a8_dynamic", dynamic_activations=True).name == "w4a8_dynamic"


# ---- vLLM: fp8_static ------------------------------------------------------------------------------
def test_fp8_static_is_vllms_static_per_tensor_fp8():
    w, a = weights_and_inputs(config("fp8_static"))
    assert vllm.is_fp8_w8a8(w, a)  # _is_fp8_w8a8
    # _is_static_tensor_w8a8-style: tensor weights, symmetric, static input, tensor input
    assert w.strategy == "tensor" and w.symmetric and not a.dynamic and a.strategy == "tensor"
    assert vllm.is_static_tensor_w8a8(w, a)
    assert not vllm.is_fp8_w4a8(w, a) and not vllm.is_dynamic_token_w8a8(w, a)


@pytest.mark.parametrize("capability,linear", [
    (90, "CompressedTensorsW8A8Fp8"),
    (100, "CompressedTensorsW8A8Fp8"),
    (80, "CompressedTensorsW8A16Fp8"),  # no FP8 tensor cores: weight-only FP8 (Marlin)
    (None, "CompressedTensorsW8A16Fp8"),  # CPU
])
def test_fp8_static_selects_vllm_fp8_linear_and_moe_paths(capability, linear):
    cfg = config("fp8_static")
    assert vllm.linear_scheme(cfg, capability=capability) == linear
    assert vllm.moe_method(cfg, capability=capability) == "CompressedTensorsW8A8Fp8MoEMethod"
    assert vllm.linear_scheme(cfg, "lm_head") is None  # ignored -> UnquantizedLinearMethod
    assert vllm.should_ignore_layer("model.layers.3.mlp.gate", cfg["ignore"])  # DeepSeek router


# ---- vLLM: w4a8_dynamic (W4AFP8) --------------------------------------------------------------------
def test_w4a8_dynamic_is_vllms_w4a8_fp8_scheme():
    cfg = config("w4a8_dynamic")
    w, a = weights_and_inputs(cfg)  # pack-quantized, yet vLLM parses input_activations
    assert w.num_bits == 4 and w.type == "int" and w.strategy == "group" and w.group_size == 128 and w.symmetric
    assert a.num_bits == 8 and a.type == "float" and a.strategy == "token" and a.dynamic
    assert vllm.is_fp8_w4a8(w, a) and vllm.is_fp8_w4a8_sm90(w, a, capability=90)
    assert vllm.linear_scheme(cfg, capability=90) == "CompressedTensorsW4A8Fp8"
    assert vllm.moe_method(cfg, capability=90) == "CompressedTensorsW4A8Fp8MoEMethod"
    assert vllm.w4a8_fp8_shape_problems(7168, 2048, moe=True) == []  # DeepSeek-V3 experts
    assert vllm.w4a8_fp8_shape_problems(100, 128) == ["out_features=100 is not divisible by 128"]


def test_w4a8_dynamic_needs_hopper_and_group_size_128():
    cfg = config("w4a8_dynamic")
    for capability in (89, 100, None):  # _is_fp8_w4a8_sm90 matches SM90 exactly; None = CPU
        with pytest.raises(NotImplementedError):
            vllm.linear_scheme(cfg, capability=capability)
    # off Hopper the MoE falls through to _is_dynamic_token_w4a8_int, a CPU-only method
    with pytest.raises(ValueError, match="CPU-only"):
        vllm.moe_method(cfg, capability=100)
    g64 = json.loads(json.dumps(CT.quantization_config("w4a8_dynamic", [], 64)))
    with pytest.raises(ValueError, match="group size 128"):
        vllm.linear_scheme(g64)
    with pytest.raises(AssertionError, match="group size 128"):
        vllm.moe_method(g64)


# ---- vLLM: w4a8 (static FP8 activations) matches nothing --------------------------------------------
@pytest.mark.parametrize("capability", [80, 89, 90, 100, None])
def test_w4a8_static_matches_no_vllm_scheme(capability):
    cfg = config("w4a8")
    w, a = weights_and_inputs(cfg)
    predicates = [vllm.is_fp8_w8a8, vllm.is_fp8_w4a8, vllm.is_fp8_w8a16, vllm.is_static_tensor_w8a8,
                  vllm.is_dynamic_token_w8a8, vllm.is_dynamic_token_w4a8_int, vllm.is_wNa16_group_channel]
    assert not any(p(w, a) for p in predicates)
    with pytest.raises(NotImplementedError, match="No compressed-tensors compatible scheme"):
        vllm.linear_scheme(cfg, capability=capability)
    with pytest.raises(RuntimeError, match="Unsupported FusedMoe scheme"):
        vllm.moe_method(cfg, capability=capability)


def test_ignored_experts_are_served_unquantized():
    cfg = json.loads(json.dumps(CT.quantization_config("w4a8", ["re:.*mlp.experts.*"], 128)))
    assert vllm.moe_method(cfg) == "UnquantizedFusedMoEMethod"


# ---- native fp8 -------------------------------------------------------------------------------------
def test_native_config_is_what_vllm_fp8config_parses():
    cfg = json.loads(json.dumps(NATIVE.quantization_config("fp8_static", IGNORE)))
    assert cfg == {"quant_method": "fp8", "activation_scheme": "static",
                   "ignored_layers": ["lm_head", "model.layers.0.self_attn.o_proj"]}
    parsed = vllm.fp8_config_from_config(cfg)
    assert parsed["is_checkpoint_fp8_serialized"] and parsed["activation_scheme"] == "static"
    assert parsed["ignored_layers"] == cfg["ignored_layers"] and parsed["weight_block_size"] is None


def test_detect_format_tells_slim_layouts_from_the_deepseek_source():
    assert detect_format(config("w4a8_dynamic")) is CT
    assert detect_format(NATIVE.quantization_config("fp8_static", [])) is NATIVE
    assert detect_format({"quant_method": "fp8", "weight_block_size": None}) is NATIVE
    deepseek = {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert detect_format(deepseek) is None and detect_format(None) is None
    with pytest.raises(ValueError, match="compressed-tensors, fp8 and w4afp8"):
        detect_format({"quant_method": "gptq"})


def test_native_refuses_what_vllm_would_misread():
    with pytest.raises(ValueError, match="format=compressed-tensors"):
        NATIVE.quantization_config("w4a8", [], 128)
    with pytest.raises(ValueError, match="expand them to module names"):
        NATIVE.quantization_config("fp8_static", ["re:.*self_attn.*"])
    with pytest.raises(ValueError, match="block-wise"):
        vllm.fp8_config_from_config({"quant_method": "fp8", "activation_scheme": "static",
                                     "weight_block_size": [128, 128]})
