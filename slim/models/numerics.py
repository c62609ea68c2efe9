"""Serving numerics: the scales a serving engine computes with, derived from the scales a checkpoint stores.

Pure functions of :class:`~slim.quant.types.QuantizedLinear` dicts (module name -> quantized Linear), applied when
a checkpoint is read back for evaluation (hf and streamed backends), so the scores are those of the engine that
serves it. ``NUMERICS`` maps a name to its transform:

    checkpoint  every scale as written
    vllm        what vLLM's loaders make of it (checked against vllm's source, files named below):
                - FP8 per-tensor Linears that vLLM fuses (``gate_proj``+``up_proj`` -> ``gate_up_proj``, DeepSeek's
                  ``q_a_proj``+``kv_a_proj_with_mqa`` -> ``fused_qkv_a_proj``, and each routed expert's gate/up ->
                  ``w13``) share one weight scale, the max of their scales, their FP8 codes requantized to it
                  (vllm/model_executor/layers/quantization/utils/w8a8_utils.py ``requantize_with_max_scale``;
                  .../utils/fp8_utils.py ``process_fp8_weight_tensor_strategy_moe``), and one input scale, the max
                  of theirs (compressed_tensors/schemes/compressed_tensors_w8a8_fp8.py);
                - MoE static input scales: one per layer for w13 and one for w2, the max over the layer's experts
                  (.../utils/fp8_utils.py ``process_fp8_input_tensor_strategy_moe``: "Using the maximum across
                  experts for each layer");
                - W4A8-FP8 (int4 groups, dynamic per-token FP8 activations): the bf16 group scales become FP8
                  codes times a per-output-channel fp32 scale (.../utils/quant_utils.py
                  ``convert_bf16_scales_to_fp8`` with ``QuantFP8(static=False, group_shape=PER_TOKEN)``, used by
                  kernels/linear/mixed_precision/cutlass.py and fused_moe/oracle/w4a8.py); activations are
                  quantized per token (input_quant_fp8.py ``forward_native``), as slim simulates dynamic schemes.
    sglang      SGLang / TensorRT-LLM static W4A8 MoE: one input scale per MoE layer for w13 and one for w2 (the
                max over the layer's experts); everything else as written.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch

from slim.errors import SlimError
from slim.quant.fp8 import FP8_DTYPE, FP8_MAX, dequantize_fp8, quantize_fp8
from slim.quant.types import QuantizedLinear

NUMERICS_CHOICES = ("auto", "checkpoint", "vllm", "sglang")
FP8_MIN_SCALING_FACTOR = 1.0 / (FP8_MAX * 512.0)  # vllm input_quant_fp8.py: _FP8_MIN_SCALING_FACTOR

# Linears vLLM loads into one fused parameter (vllm/model_executor/models/deepseek_v2.py stacked_params_mapping)
FUSED = {"gate_proj": "gate_up", "up_proj": "gate_up", "q_a_proj": "qkv_a", "kv_a_proj_with_mqa": "qkv_a"}
EXPERT = re.compile(r"^(?P<moe>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>\w+)$")

Modules = dict[str, QuantizedLinear]


def _fused_groups(mods: Mapping[str, QuantizedLinear]) -> dict[tuple[str, str], list[str]]:
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name in mods:
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            groups[(parent, FUSED[leaf])].append(name)
    return {k: v for k, v in groups.items() if len(v) > 1}


def _moe_input_groups(mods: Mapping[str, QuantizedLinear]) -> dict[tuple[str, str], list[str]]:
    """Routed experts' static-input Linears by (MoE layer, w13 | w2)."""
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for name, q in mods.items():
        m = EXPERT.match(name)
        if m and q.input_scale is not None:
            groups[(m["moe"], "w2" if m["proj"] == "down_proj" else "w13")].append(name)
    return groups


def shared_input_scale(mods: Mapping[str, QuantizedLinear], groups) -> Modules:
    """Every member of a group computes with the max of the group's input scales."""
    out = dict(mods)
    for names in groups.values():
        scale = torch.stack([mods[n].input_scale.float().reshape(()) for n in names]).max().reshape(1)
        for n in names:
            out[n] = replace(mods[n], input_scale=scale.clone())
    return out


def requantize_fused_fp8(mods: Mapping[str, QuantizedLinear]) -> Modules:
    """Per-tensor FP8 Linears vLLM fuses: codes requantized to the max weight scale; input scale the max."""
    out = dict(mods)
    for names in _fused_groups(mods).values():
        members = [mods[n] for n in names]
        if any(q.weight_bits != 8 or q.weight_scale.numel() != 1 for q in members):
            continue
        w_max = torch.stack([q.weight_scale.float().reshape(()) for q in members]).max().reshape(1)
        statics = [q.input_scale for q in members if q.input_scale is not None]
        x_max = torch.stack([s.float().reshape(()) for s in statics]).max().reshape(1) if statics else None
        for n, q in zip(names, members):
            codes = quantize_fp8(dequantize_fp8(q.weight, q.weight_scale.float(), torch.float32), w_max)
            out[n] = replace(q, weight=codes, weight_scale=w_max.clone(),
                             input_scale=None if x_max is None else x_max.clone())
    return out


def fp8_group_scales(scale: torch.Tensor) -> torch.Tensor:
    """[out, groups] group scales -> the scales vLLM's CUTLASS W4A8 kernels multiply by: per output row
    ``chan = max|s| / 448`` (at least 1/(448*512)), ``s8 = fp8(fp8(s / chan) / 8)``, effective ``s8 * chan * 8``."""
    s = scale.float()  # [out, groups]
    chan = (s.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=FP8_MIN_SCALING_FACTOR)  # [out, 1]
    codes = (s * chan.reciprocal()).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    codes = (codes.float() / 8.0).to(FP8_DTYPE)
    return codes.float() * (chan * 8.0)


def requantize_int4_scales(mods: Mapping[str, QuantizedLinear]) -> Modules:
    """W4A8-FP8 (dynamic activations): group scales as vLLM's FP8 scale + per-channel scale."""
    return {n: replace(q, weight_scale=fp8_group_scales(q.weight_scale))
            if q.weight_bits == 4 and q.input_scale is None else q for n, q in mods.items()}


def vllm_numerics(mods: Mapping[str, QuantizedLinear]) -> Modules:
    static_w4 = [n for n, q in mods.items() if q.weight_bits == 4 and q.input_scale is not None]
    if static_w4:
        raise SlimError(f"{static_w4[0]} is int4 with a static FP8 input scale, which vLLM does not serve; use "
                        "eval.numerics=sglang (or checkpoint), or export scheme=w4a8_dynamic for vLLM")
    mods = requantize_fused_fp8(mods)
    mods = shared_input_scale(mods, _moe_input_groups(mods))
    return requantize_int4_scales(mods)


def sglang_numerics(mods: Mapping[str, QuantizedLinear]) -> Modules:
    return shared_input_scale(mods, _moe_input_groups(mods))


NUMERICS: dict[str, Callable[[Mapping[str, QuantizedLinear]], Modules]] = {
    "checkpoint": dict,
    "vllm": vllm_numerics,
    "sglang": sglang_numerics,
}


def apply_numerics(numerics: str, mods: Mapping[str, QuantizedLinear]) -> Modules:
    """The modules as ``numerics`` computes with them; ``mods`` must hold whole MoE layers and fused groups
    (a decoder layer's quantized Linears, or a whole model's)."""
    return NUMERICS[numerics](mods)


def _static_int4(qcfg: Mapping) -> bool:
    for group in (qcfg.get("config_groups") or {}).values():
        w, a = group.get("weights") or {}, group.get("input_activations") or {}
        if w.get("num_bits") == 4 and a and not a.get("dynamic", False):
            return True
    return False


# quant_method -> the numerics of the engine that serves that layout (auto)
AUTO_BY_METHOD: dict[str, Callable[[Mapping], str]] = {
    "compressed-tensors": lambda q: "checkpoint" if _static_int4(q) else "vllm",
    "fp8": lambda q: "checkpoint" if q.get("weight_block_size") else "vllm",  # block FP8: a source checkpoint
    "w4afp8": lambda q: "sglang",
}


def resolve_numerics(requested: str, quantization_config: Mapping | None) -> str:
    """``auto`` -> the serving engine's numerics for this checkpoint layout; other names pass through."""
    if requested not in NUMERICS_CHOICES:
        raise SlimError(f"eval.numerics={requested!r} is not valid; choose one of: {', '.join(NUMERICS_CHOICES)}")
    if requested != "auto":
        return requested
    if not quantization_config:
        return "checkpoint"
    rule = AUTO_BY_METHOD.get(quantization_config.get("quant_method"))
    return rule(quantization_config) if rule else "checkpoint"
