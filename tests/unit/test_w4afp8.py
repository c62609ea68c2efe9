"""The w4afp8 format's numerics and refusals, each rule restated from the engine source it comes from.

Sources (read, not imported: neither engine installs on these CPU machines, see docs/w4afp8.md):
- TensorRT-LLM cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp ``pack_int8_tensor_to_packed_int4`` /
  ``unpack_int4_packed_tensor_to_int8``: byte i = (c[2i] & 0x0F) | (c[2i+1] << 4), unpacked with sign extension.
- SGLang python/sglang/srt/layers/quantization/w4afp8.py ``W4AFp8MoEMethod``: group_size 128, int8 [E, N, K/2]
  weights, fp32 [E, N, K/128] ``weight_scale_inv`` cast to bf16 after loading, bf16 input-scale parameters.
"""

from __future__ import annotations

import types

import pytest
import torch
from tests.helpers.configs import compose_config

from slim.config import validate
from slim.errors import SlimError
from slim.formats import FORMATS, detect_format
from slim.formats.w4afp8 import input_scale_name, pack_nibbles, unpack_nibbles
from slim.quant.fp8 import fp8_scale
from slim.models.input_scales import layer_max, merge_input_amax, representable_amax, resolve_mode
from slim.quant.types import QuantizedLinear

FMT = FORMATS["w4afp8"]
EXPERT = "model.layers.3.mlp.experts.5.gate_proj"


def trtllm_pack(codes: torch.Tensor) -> torch.Tensor:
    """TensorRT-LLM's C loop, element by element: packed |= elt_0 & 0x0F; packed |= int8(elt_1 << 4)."""
    flat, out = codes.reshape(-1).tolist(), []
    for i in range(len(flat) // 2):
        b = (flat[2 * i] & 0x0F) | ((flat[2 * i + 1] << 4) & 0xF0)
        out.append(b - 256 if b > 127 else b)
    return torch.tensor(out, dtype=torch.int8).reshape(codes.shape[0], codes.shape[1] // 2)


def trtllm_unpack(packed: torch.Tensor) -> torch.Tensor:
    """elt_0 = int8(packed << 4) >> 4 (sign extension); elt_1 = packed >> 4 (arithmetic)."""
    out = []
    for p in packed.reshape(-1).tolist():
        lo = ((p << 4) & 0xFF)
        lo = (lo - 256 if lo > 127 else lo) >> 4
        out += [lo, p >> 4]
    return torch.tensor(out, dtype=torch.int8).reshape(packed.shape[0], packed.shape[1] * 2)


def make_expert(out: int = 6, inp: int = 256, seed: int = 0, amax: float = 5.0) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp // 128, 128, generator=g)
    scale = (w.abs().amax(-1) / 7.5).to(torch.bfloat16).float()  # [out, in / 128], bf16 values
    codes = torch.clamp(torch.round(w / scale[..., None]), -8, 7).to(torch.int8).reshape(out, inp)
    input_scale = fp8_scale(representable_amax(torch.tensor(amax), torch.bfloat16)).reshape(1)
    return QuantizedLinear(codes, scale, input_scale, weight_bits=4, group_size=128)


# ---- nibbles ---------------------------------------------------------------------------------------
def test_nibble_order_is_tensorrt_llms_for_every_code_pair():
    codes = torch.tensor([[a, b] for a in range(-8, 8) for b in range(-8, 8)], dtype=torch.int8).reshape(1, -1)
    packed = pack_nibbles(codes)
    assert packed.dtype == torch.int8 and packed.shape == (1, 256)
    assert torch.equal(packed, trtllm_pack(codes))
    assert torch.equal(unpack_nibbles(packed), codes)
    assert torch.equal(trtllm_unpack(packed), codes)
    # element 2j in the low nibble: codes (1, -1) -> 0xF1
    assert pack_nibbles(torch.tensor([[1, -1]], dtype=torch.int8)).view(torch.uint8).item() == 0xF1


def test_round_trip_is_bit_exact_and_names_follow_sglang():
    q = make_expert()
    tensors = FMT.tensors(EXPERT, q)
    assert set(tensors) == {f"{EXPERT}.weight", f"{EXPERT}.weight_scale_inv",
                            "model.layers.3.mlp.experts.5.w1.input_scale"}
    assert tensors[f"{EXPERT}.weight"].dtype == torch.int8 and tensors[f"{EXPERT}.weight"].shape == (6, 128)
    scale = tensors[f"{EXPERT}.weight_scale_inv"]
    assert scale.dtype == torch.float32 and scale.shape == (6, 2)  # [N, K / 128], not transposed
    back = FMT.read(EXPERT, tensors)
    assert torch.equal(back.weight, q.weight) and torch.equal(back.weight_scale, q.weight_scale)
    assert torch.equal(back.input_scale, q.input_scale) and back.group_size == 128
    # weight_scale_inv multiplies (w ~= code * s), as both engines' kernels use it
    w = FMT.dequantize(back, torch.float32)
    assert torch.equal(w[:, :128], q.weight[:, :128].float() * q.weight_scale[:, :1])


@pytest.mark.parametrize("proj,shard", [("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")])
def test_input_scale_shard_names(proj, shard):
    assert input_scale_name(f"model.layers.7.mlp.experts.11.{proj}") == f"model.layers.7.mlp.experts.11.{shard}.input_scale"


@pytest.mark.parametrize("name", ["model.layers.3.mlp.shared_experts.gate_proj", "model.layers.0.self_attn.o_proj",
                                  "lm_head"])
def test_only_routed_experts_are_int4(name):
    with pytest.raises(ValueError, match="routed expert"):
        FMT.tensors(name, make_expert())


def test_tensors_refuse_what_the_engines_would_misread():
    q = make_expert()
    with pytest.raises(ValueError, match="group_size 128"):
        FMT.tensors(EXPERT, QuantizedLinear(q.weight, q.weight_scale.repeat_interleave(2, 1), q.input_scale, 4, 64))
    with pytest.raises(ValueError, match="bf16"):
        FMT.tensors(EXPERT, QuantizedLinear(q.weight, q.weight_scale * (1 + 2**-12), q.input_scale, 4, 128))
    with pytest.raises(ValueError, match="bf16 parameter"):
        FMT.tensors(EXPERT, QuantizedLinear(q.weight, q.weight_scale, fp8_scale(torch.tensor([5.0])), 4, 128))
    with pytest.raises(ValueError, match="static input_scale"):
        FMT.tensors(EXPERT, QuantizedLinear(q.weight, q.weight_scale, None, 4, 128))


def test_read_refuses_a_missing_input_scale():
    tensors = FMT.tensors(EXPERT, make_expert())
    del tensors["model.layers.3.mlp.experts.5.w1.input_scale"]
    with pytest.raises(KeyError, match="w1.input_scale"):
        FMT.read(EXPERT, tensors)


# ---- config ----------------------------------------------------------------------------------------
def test_quantization_config_routes_sglang_and_detects_back():
    qc = FMT.quantization_config("w4a8", [], 128)
    assert qc["quant_method"] == "w4afp8"  # SGLang QUANTIZATION_METHODS key -> W4AFp8Config
    assert qc["weight_block_size"] == [128, 128] and qc["group_size"] == 128
    assert detect_format(qc) is FMT
    for bad in (("fp8_static", 128), ("w4a8_dynamic", 128), ("w4a8", 64)):
        with pytest.raises(ValueError):
            FMT.quantization_config(bad[0], [], bad[1])


def deepseek_config(**kw):
    base = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3")
    return types.SimpleNamespace(**(base | kw))


LINEARS = ["model.layers.0.self_attn.o_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.shared_experts.up_proj",
           "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj",
           "model.layers.1.mlp.experts.0.down_proj", "lm_head"]
EXPERTS = [n for n in LINEARS if ".experts.0." in n]


def test_check_model_accepts_the_reference_selection():
    FMT.check_model(deepseek_config(), LINEARS, EXPERTS, 128, False)


@pytest.mark.parametrize("config,targets,group,mtp,message", [
    (deepseek_config(architectures=["Qwen3MoeForCausalLM"]), EXPERTS, 128, False, "compressed-tensors"),
    (deepseek_config(), EXPERTS, 64, False, "group_size=128"),
    (deepseek_config(), EXPERTS[:2], 128, False, "leaves 1 unquantized"),
    (deepseek_config(), EXPERTS + ["model.layers.0.self_attn.o_proj"], 128, False, "ignore them"),
    (deepseek_config(), EXPERTS, 128, True, "copy_mtp=false"),
])
def test_check_model_refuses_with_the_fix(config, targets, group, mtp, message):
    with pytest.raises(ValueError, match=message):
        FMT.check_model(config, LINEARS, targets, group, mtp)


@pytest.mark.parametrize("overrides,message", [
    (["scheme=fp8_static", "scheme.format=w4afp8"], "scheme=w4a8"),
    (["scheme=w4a8", "scheme.format=w4afp8", "scheme.group_size=64"], "group_size 128"),
    (["scheme=w4a8", "export.moe_input_scale=median"], "export.moe_input_scale"),
])
def test_config_refuses_what_w4afp8_cannot_store(overrides, message):
    with pytest.raises(SlimError, match=message):
        validate(compose_config(*overrides))


def test_config_accepts_w4afp8():
    cfg = validate(compose_config("scheme=w4a8", "scheme.format=w4afp8"))
    assert cfg.export.moe_input_scale == "auto"


def test_trtllm_files_list_every_layer_once():
    config = dict(num_hidden_layers=4, first_k_dense_replace=1, moe_layer_freq=1, q_lora_rank=256,
                  n_routed_experts=16, n_shared_experts=1)
    files = FMT.extra_files(config)
    assert files["hf_quant_config.json"] == {"quantization": {"quant_algo": "MIXED_PRECISION",
                                                              "kv_cache_quant_algo": None}}
    layers = files["quant_cfg.json"]["quantized_layers"]
    assert layers["model.layers.0.mlp.gate_up_proj"] == {"quant_algo": "FP8_BLOCK_SCALES"}
    assert "model.layers.0.mlp.experts" not in layers
    for i in (1, 2, 3):
        assert layers[f"model.layers.{i}.mlp.experts"] == {"quant_algo": "W4A8_AWQ"}
        assert layers[f"model.layers.{i}.mlp.shared_experts.down_proj"] == {"quant_algo": "FP8_BLOCK_SCALES"}
        assert f"model.layers.{i}.mlp.gate_up_proj" not in layers
    assert sum(k.endswith("self_attn.fused_a") for k in layers) == 4


# ---- input scales ----------------------------------------------------------------------------------
def test_layer_max_merges_gate_and_up_and_keeps_down_apart():
    amax = {"model.layers.1.mlp.experts.0.gate_proj": torch.tensor(1.0),
            "model.layers.1.mlp.experts.0.up_proj": torch.tensor(1.0),
            "model.layers.1.mlp.experts.1.gate_proj": torch.tensor(3.0),
            "model.layers.1.mlp.experts.1.up_proj": torch.tensor(3.0),
            "model.layers.1.mlp.experts.0.down_proj": torch.tensor(2.0),
            "model.layers.1.mlp.experts.1.down_proj": torch.tensor(9.0),
            "model.layers.2.mlp.experts.0.gate_proj": torch.tensor(0.5),
            "model.layers.1.self_attn.o_proj": torch.tensor(50.0)}
    out = layer_max(amax)
    assert [float(out[f"model.layers.1.mlp.experts.{e}.{p}"]) for e in (0, 1) for p in ("gate_proj", "up_proj")] == [3.0] * 4
    assert float(out["model.layers.1.mlp.experts.0.down_proj"]) == 9.0
    assert float(out["model.layers.2.mlp.experts.0.gate_proj"]) == 0.5  # another layer
    assert float(out["model.layers.1.self_attn.o_proj"]) == 50.0  # not an expert


def test_representable_amax_gives_the_smallest_bf16_scale_not_below_the_observed_one():
    amax = torch.rand(4000) * 100 + 1e-3
    scale = fp8_scale(representable_amax(amax, torch.bfloat16))  # what Scheme.input_scale computes from it
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)
    assert bool((scale >= amax / 448).all())
    below = torch.nextafter(scale.to(torch.bfloat16), torch.zeros_like(scale).to(torch.bfloat16)).float()
    assert bool((below < amax / 448).all())  # the next bf16 value down would clip


def test_merge_input_amax_expert_mode_without_dtype_is_the_identity():
    amax = {"model.layers.1.mlp.experts.0.gate_proj": torch.tensor(1.2345)}
    assert merge_input_amax(amax, "expert", None) == amax
    assert resolve_mode("auto", "w4afp8") == "layer_max" and resolve_mode("auto", "compressed-tensors") == "expert"
    assert resolve_mode("expert", "w4afp8") == "expert"
