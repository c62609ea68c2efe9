"""Serving numerics (slim.models.numerics) against their definitions in vLLM's loaders."""

import json
import os
import subprocess

import pytest
import torch

from slim.models.numerics import apply_numerics, fp8_group_scales, resolve_numerics
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8, fp8_scale, quantize_fp8
from slim.quant.types import QuantizedLinear


def fp8_linear(w: torch.Tensor, input_scale: float | None) -> QuantizedLinear:
    s = fp8_scale(w.abs().max().reshape(1))
    return QuantizedLinear(quantize_fp8(w, s), s, None if input_scale is None else torch.tensor([input_scale]), 8)


def int4_linear(out=4, inp=256, g=128, input_scale=None, seed=0) -> QuantizedLinear:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(-8, 8, (out, inp), generator=gen, dtype=torch.int8)
    scale = (torch.rand(out, inp // g, generator=gen) * 0.02 + 1e-4).to(torch.bfloat16).float()
    return QuantizedLinear(codes, scale, None if input_scale is None else torch.tensor([input_scale]), 4, g)


def moe_layer(scales: dict[int, tuple[float, float, float]]) -> dict[str, QuantizedLinear]:
    torch.manual_seed(0)
    mods = {}
    for e, (g, u, d) in scales.items():
        for proj, x in (("gate_proj", g), ("up_proj", u), ("down_proj", d)):
            mods[f"model.layers.1.mlp.experts.{e}.{proj}"] = fp8_linear(torch.randn(8, 16) * (e + 1), x)
    return mods


def test_vllm_fp8_moe_input_scale_is_the_layer_max_over_experts():
    mods = moe_layer({0: (0.5, 0.5, 2.0), 1: (1.5, 1.5, 0.25), 2: (0.1, 0.1, 0.1)})
    out = apply_numerics("vllm", mods)
    for name, q in out.items():
        expected = 2.0 if name.endswith("down_proj") else 1.5  # w2: max of down; w13: max of gate/up
        assert q.input_scale.item() == expected
    assert all(torch.equal(out[n].weight_scale, mods[n].weight_scale) or not n.endswith("down_proj") for n in mods)


def test_vllm_requantizes_fused_gate_up_to_the_max_weight_scale():
    mods = moe_layer({0: (1.0, 1.0, 1.0)})
    gate, up = "model.layers.1.mlp.experts.0.gate_proj", "model.layers.1.mlp.experts.0.up_proj"
    mods[up] = fp8_linear(torch.randn(8, 16) * 10, 1.0)  # a larger weight scale than gate's
    out = apply_numerics("vllm", mods)
    w_max = torch.maximum(mods[gate].weight_scale, mods[up].weight_scale)
    assert out[gate].weight_scale.item() == out[up].weight_scale.item() == w_max.item()
    assert torch.equal(out[up].weight.view(torch.uint8), mods[up].weight.view(torch.uint8))  # already at the max
    # gate: vLLM's requantize_with_max_scale: scaled_fp8_quant(per_tensor_dequantize(w, s), max_s)
    ref = quantize_fp8(dequantize_fp8(mods[gate].weight, mods[gate].weight_scale), w_max)
    assert torch.equal(out[gate].weight.view(torch.uint8), ref.view(torch.uint8))
    assert not torch.equal(out[gate].weight.view(torch.uint8), mods[gate].weight.view(torch.uint8))


def test_checkpoint_numerics_changes_nothing_and_sglang_only_moe_input_scales():
    mods = moe_layer({0: (0.5, 0.5, 2.0), 1: (1.5, 1.5, 0.25)})
    mods["model.layers.1.self_attn.q_a_proj"] = fp8_linear(torch.randn(8, 16), 0.3)
    assert apply_numerics("checkpoint", mods) == mods
    out = apply_numerics("sglang", mods)
    assert out["model.layers.1.self_attn.q_a_proj"] is mods["model.layers.1.self_attn.q_a_proj"]
    assert out["model.layers.1.mlp.experts.0.up_proj"].input_scale.item() == 1.5
    assert out["model.layers.1.mlp.experts.1.down_proj"].input_scale.item() == 2.0
    assert all(torch.equal(out[n].weight.view(torch.uint8), mods[n].weight.view(torch.uint8)) for n in mods)


def test_w4a8_fp8_group_scales_follow_the_definition():
    q = int4_linear()
    eff = fp8_group_scales(q.weight_scale)
    chan = q.weight_scale.abs().amax(-1, keepdim=True) / 448.0
    s8 = ((q.weight_scale / chan).to(FP8_DTYPE).float() / 8.0).to(FP8_DTYPE).float()
    assert torch.equal(eff, s8 * chan * 8.0)
    assert (eff - q.weight_scale).abs().max() > 0  # FP8 scales are not the bf16 ones
    assert torch.allclose(eff, q.weight_scale, rtol=0.07)  # 3 mantissa bits
    out = apply_numerics("vllm", {"model.layers.1.mlp.experts.0.down_proj": q})
    assert torch.equal(out["model.layers.1.mlp.experts.0.down_proj"].weight_scale, eff)


def test_static_int4_has_no_vllm_numerics():
    from slim.errors import SlimError

    with pytest.raises(SlimError, match="eval.numerics=sglang"):
        apply_numerics("vllm", {"model.layers.1.mlp.experts.0.down_proj": int4_linear(input_scale=0.1)})


@pytest.mark.parametrize("qcfg,expected", [
    (None, "checkpoint"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "checkpoint"),  # DeepSeek's source layout
    ({"quant_method": "fp8", "activation_scheme": "static"}, "vllm"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8}, "input_activations": {"num_bits": 8, "dynamic": False}}}}, "vllm"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 4}, "input_activations": {"num_bits": 8, "dynamic": True}}}}, "vllm"),
    ({"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 4}, "input_activations": {"num_bits": 8, "dynamic": False}}}}, "checkpoint"),
    ({"quant_method": "w4afp8"}, "sglang"),
])
def test_auto_numerics_is_the_serving_engines(qcfg, expected):
    assert resolve_numerics("auto", qcfg) == expected
    assert resolve_numerics("checkpoint", qcfg) == "checkpoint"


VLLM_REFERENCE = """
import json, sys, torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape
s = torch.tensor(json.loads(sys.stdin.read()), dtype=torch.bfloat16)
# convert_bf16_scales_to_fp8 (quant_utils.py) on a CPU: its quant_fp8 is QuantFP8(static=False, PER_TOKEN)
with set_current_vllm_config(VllmConfig()):
    fp8, chan = QuantFP8(static=False, group_shape=GroupShape.PER_TOKEN).forward_native(s)
fp8 = (fp8.float() / 8.0).to(torch.float8_e4m3fn)
print(json.dumps((fp8.float() * (chan * 8.0)).tolist()))
"""


@pytest.mark.vllm
def test_w4a8_fp8_group_scales_equal_vllms_own_conversion():
    q = int4_linear(out=16, inp=1024, seed=3)
    proc = subprocess.run([os.environ["SLIM_VLLM_PYTHON"], "-c", VLLM_REFERENCE], input=json.dumps(
        q.weight_scale.tolist()), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert torch.equal(fp8_group_scales(q.weight_scale), torch.tensor(json.loads(proc.stdout.splitlines()[-1])))
