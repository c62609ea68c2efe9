"""The DeepSeek W4AFP8 layout: static W4A8 as SGLang and TensorRT-LLM serve it (``scheme.format=w4afp8``).

Routed experts ``model.layers.L.mlp.experts.E.{gate,up,down}_proj`` (the only int4 Linears):
    <m>.weight            int8 [N, K/2]: signed int4 codes packed along the input dim, code 2j in the low
                          nibble, 2j+1 in the high nibble (TensorRT-LLM ``pack_int8_tensor_to_packed_int4``,
                          cpp/tensorrt_llm/thop/weightOnlyQuantOp.cpp; SGLang ``W4AFp8MoEMethod.create_weights``
                          allocates ``w13_weight`` int8 [E, 2I, H/2] and ``w2_weight`` [E, H, I/2])
    <m>.weight_scale_inv  fp32 [N, K/128], *multiplied*: w ~= code * scale (both engines cast it to bf16 on load:
                          SGLang ``process_weights_after_loading``, TensorRT-LLM ``WInt4AFP8FusedMoEMethod
                          .load_quant_scales``; so slim's scales are bf16 values, stored exactly in fp32)
    experts.E.{w1,w3,w2}.input_scale  fp32 [1] (w1 gate, w3 up, w2 down): the static FP8 activation scale, a bf16
                          value (SGLang loads it into a bf16 parameter and refuses w1 != w3 beyond 1e-5:
                          sglang/srt/layers/moe/fused_moe_triton/layer.py ``_weight_loader_impl``)
Every other decoder Linear (attention, shared experts, dense MLPs): DeepSeek's block FP8, ``weight`` e4m3 +
``weight_scale_inv`` fp32 per 128x128 block (SGLang ``W4AFp8Config.get_quant_method`` gives every ``LinearBase``
``Fp8LinearMethod`` and never reads an ignore list): the source's bytes when the source is block FP8, else
quantized here (amax / 448 per block). Router, norms, embeddings and lm_head stay as stored.

Config: ``config.json`` ``quantization_config.quant_method = "w4afp8"`` (SGLang reads this first,
sglang/srt/configs/model_config.py); ``hf_quant_config.json`` ``{"quantization": {"quant_algo":
"MIXED_PRECISION"}}`` and ``quant_cfg.json`` per layer (TensorRT-LLM reads these first and config.json only
without them: tensorrt_llm/_torch/model_config.py ``from_pretrained``). SGLang reads hf_quant_config.json only
when config.json has no quantization_config, and maps MIXED_PRECISION to the same ``w4afp8``. See docs/w4afp8.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import torch

from slim.formats.base import SCHEMES, Scheme, check_module_name, resolve_scheme, take
from slim.models.checkpoint import BLOCK_SCALE_SUFFIX
from slim.models.deepseek_fp8 import FP8_WEIGHT_RE
from slim.quant.fp8 import FP8_DTYPE, quantize_fp8_block
from slim.quant.int4 import INT4_MAX, INT4_MIN, dequantize_int4
from slim.quant.types import QuantizedLinear

GROUP_SIZE = 128  # the engines' kernels: SGLang W4AFp8Config.group_size, TensorRT-LLM's K multiple of 128
BLOCK = (128, 128)  # the other Linears' FP8 blocks (weight_block_size)
ARCHITECTURES = ("DeepseekV3ForCausalLM",)  # TensorRT-LLM modeling_deepseekv3.py; SGLang deepseek_v2.py
EXPERT_RE = re.compile(r"^(?P<expert>model\.layers\.\d+\.mlp\.experts\.\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")
# checkpoint projection -> the shard name of its input scale (FusedMoE.make_expert_input_scale_params_mapping)
SHARD = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
INPUT_SCALE_DTYPE = torch.bfloat16  # the dtype the engines hold input scales in


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] in [-8, 7] -> int8 [N, K/2]: code 2j in the low nibble, code 2j+1 in the high one."""
    u = codes.contiguous().view(torch.uint8)  # two's complement: the low 4 bits are the int4 code
    return ((u[:, 0::2] & 0x0F) | (u[:, 1::2] << 4)).contiguous().view(torch.int8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int8 [N, K/2] -> int8 codes [N, K] (sign-extended nibbles)."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(packed, 4), 4)  # arithmetic shift: sign-extends
    high = torch.bitwise_right_shift(packed, 4)
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)


def input_scale_name(module_name: str) -> str:
    """``...experts.E.gate_proj`` -> ``...experts.E.w1.input_scale`` (w1 gate, w3 up, w2 down)."""
    m = EXPERT_RE.match(module_name)
    if m is None:
        raise ValueError(f"{module_name} is not a routed expert projection (model.layers.L.mlp.experts.E.*_proj); "
                         "format w4afp8 stores int4 for routed experts only")
    return f"{m['expert']}.{SHARD[m['proj']]}.input_scale"


class W4AFp8Format:
    """Routed experts int4 (group 128, static FP8 input scales), every other decoder Linear block FP8."""

    name = "w4afp8"
    quantized_suffixes = ("weight", "weight_scale_inv")
    group_scale_dtype: torch.dtype | None = torch.bfloat16  # see module docstring: both engines cast to bf16
    input_scale_dtype: torch.dtype | None = INPUT_SCALE_DTYPE
    packs_int4 = False  # nibble pairs, not compressed-tensors' int32 words
    engine_only_config = True  # transformers has no "w4afp8" quantizer: slim's reader drops it from the loaded config

    def supports(self, scheme: str | Scheme) -> bool:
        """int4 group weights with static FP8 activations (what ``w4a8`` describes)."""
        spec = resolve_scheme(scheme) if isinstance(scheme, Scheme) or scheme in SCHEMES else None
        return spec is not None and spec.handler == SCHEMES["w4a8"].handler and spec.static_activations

    # ---- tensors ---------------------------------------------------------------------------------
    def tensors(self, module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
        """On-disk tensors of one routed expert projection (see the module docstring)."""
        check_module_name(module_name)
        scale_key = input_scale_name(module_name)
        codes = q.weight  # int8 [N, K]
        if q.weight_bits != 4 or codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(f"{module_name}: w4afp8 stores int4 codes (int8 [out, in]) for routed experts, got "
                             f"{q.weight_bits}-bit {codes.dtype} {tuple(codes.shape)}; use scheme=w4a8")
        if q.group_size != GROUP_SIZE:
            raise ValueError(f"{module_name}: w4afp8 needs group_size {GROUP_SIZE} (the engines' kernels), got "
                             f"{q.group_size}; set scheme.group_size=128")
        out_features, in_features = codes.shape
        if in_features % GROUP_SIZE:
            raise ValueError(f"{module_name}: in_features {in_features} is not a multiple of {GROUP_SIZE}")
        lo, hi = (int(v) for v in torch.aminmax(codes)) if codes.numel() else (0, 0)
        if lo < INT4_MIN or hi > INT4_MAX:
            raise ValueError(f"{module_name}: int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], got [{lo}, {hi}]")
        scale = q.weight_scale.float()  # [N, K/128]
        if tuple(scale.shape) != (out_features, in_features // GROUP_SIZE):
            raise ValueError(f"{module_name}.weight_scale has shape {tuple(scale.shape)}, expected "
                             f"{(out_features, in_features // GROUP_SIZE)} = [out, in / 128]")
        if not torch.equal(scale.to(self.group_scale_dtype).float(), scale):
            raise ValueError(f"{module_name}: group scales are not bf16 values, which both engines cast them to; "
                             "round them with `s.to(torch.bfloat16).float()` before computing the codes")
        if q.input_scale is None or q.input_scale.numel() != 1:
            raise ValueError(f"{module_name}: w4afp8 experts need one static input_scale (calibrate with w4a8)")
        input_scale = q.input_scale.reshape(1).float()
        if not torch.equal(input_scale.to(INPUT_SCALE_DTYPE).float(), input_scale):
            raise ValueError(f"{module_name}: input_scale {float(input_scale)} does not survive the engines' bf16 "
                             "parameter; compute it from slim.models.input_scales.representable_amax")
        return {
            f"{module_name}.weight": pack_nibbles(codes),  # int8 [N, K/2]
            f"{module_name}{'.weight' + BLOCK_SCALE_SUFFIX}": scale.contiguous(),  # fp32 [N, K/128]
            scale_key: input_scale,  # fp32 [1]
        }

    # ---- read / dequantize -----------------------------------------------------------------------
    def quantized_modules(self, names: Iterable[str]) -> dict[str, list[str]]:
        """``{expert projection: its tensor names}`` for every routed expert with a ``weight_scale_inv``."""
        names = set(names)
        out = {}
        for n in sorted(names):
            if not n.endswith(".weight" + BLOCK_SCALE_SUFFIX):
                continue
            module = n[: -len(".weight" + BLOCK_SCALE_SUFFIX)]
            if EXPERT_RE.match(module):
                out[module] = [f"{module}.weight", n] + [k for k in (input_scale_name(module),) if k in names]
        return out

    def read(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedLinear:
        """Inverse of :meth:`tensors`, bit-exact: codes, fp32 scales, the stored input scale."""
        packed = take(tensors, module_name, "weight", self.name)
        scale = take(tensors, module_name, "weight" + BLOCK_SCALE_SUFFIX, self.name)
        if packed.dtype != torch.int8 or packed.dim() != 2 or scale.dim() != 2:
            raise ValueError(f"{module_name}: expected int8 [N, K/2] nibbles and fp32 [N, K/128] scales, got "
                             f"{packed.dtype} {tuple(packed.shape)} and {scale.dtype} {tuple(scale.shape)}")
        codes = unpack_nibbles(packed)  # [N, K]
        if scale.shape[0] != codes.shape[0] or scale.shape[1] * GROUP_SIZE != codes.shape[1]:
            raise ValueError(f"{module_name}: scales {tuple(scale.shape)} do not match weight {tuple(codes.shape)} "
                             f"in groups of {GROUP_SIZE}")
        key = input_scale_name(module_name)
        if key not in tensors:
            raise KeyError(f"{key} is missing: every w4afp8 expert projection has a static input scale")
        return QuantizedLinear(weight=codes, weight_scale=scale.float(), input_scale=tensors[key].reshape(1).float(),
                               weight_bits=4, group_size=GROUP_SIZE)

    def dequantize(self, q: QuantizedLinear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_int4(q.weight, q.weight_scale, q.group_size, dtype)

    # ---- the other Linears -----------------------------------------------------------------------
    def rest_tensors(self, name: str, tensor: torch.Tensor, reader) -> dict[str, torch.Tensor] | None:
        """A decoder Linear weight that is not int4: block FP8 (the source's bytes if it has them, else quantized
        128x128). None for every other tensor (written as the stage always writes it)."""
        if not FP8_WEIGHT_RE.match(name):
            return None
        scale_name = name + BLOCK_SCALE_SUFFIX
        if name in reader and scale_name in reader and reader.raw(name).dtype == FP8_DTYPE:
            return {name: reader.raw(name), scale_name: reader.raw(scale_name)}  # the source's bytes
        if tensor.is_meta or tensor.dim() != 2:
            raise ValueError(f"{name}: expected a materialized 2-D weight to quantize to block FP8")
        q, scale_inv = quantize_fp8_block(tensor, BLOCK)
        return {name: q, scale_name: scale_inv}

    @staticmethod
    def rest_nbytes(name: str, shape: Sequence[int], dtype_bytes: int) -> int:
        """Bytes :meth:`rest_tensors` (or the stage) writes for the unquantized parameter ``name``."""
        n = 1
        for d in shape:
            n *= d
        if FP8_WEIGHT_RE.match(name) and len(shape) == 2:
            return n + -(-shape[0] // BLOCK[0]) * -(-shape[1] // BLOCK[1]) * 4
        return n * dtype_bytes

    @staticmethod
    def quantized_nbytes(out_features: int, in_features: int) -> int:
        """An expert projection on disk: nibbles, fp32 group scales, its fp32 input scale."""
        return out_features * in_features // 2 + out_features * (in_features // GROUP_SIZE) * 4 + 4

    # ---- config ----------------------------------------------------------------------------------
    def quantization_config(self, scheme: str | Scheme, ignore: Sequence[str], group_size: int | None = None,
                            dynamic_activations: bool | None = None) -> dict:
        """config.json ``quantization_config`` (SGLang ``W4AFp8Config.from_config`` reads ``quant_method``; the
        rest states the layout for readers and for slim)."""
        spec = resolve_scheme(scheme, dynamic_activations)
        if not self.supports(spec):
            raise ValueError(f"format {self.name} stores scheme w4a8 (static FP8 activations) only, not "
                             f"{spec.name}; use format=compressed-tensors")
        if group_size != GROUP_SIZE:
            raise ValueError(f"format {self.name} needs group_size {GROUP_SIZE}, got {group_size}")
        return {
            "quant_method": "w4afp8",
            "group_size": GROUP_SIZE,
            "weight_block_size": list(BLOCK),
            "moe_activation_scheme": "static",
            "linear_activation_scheme": "dynamic",
            "fmt": "e4m3",
        }

    def extra_files(self, config: Mapping) -> dict[str, dict]:
        """``hf_quant_config.json`` and ``quant_cfg.json`` for TensorRT-LLM (layer names as in its writer,
        examples/quantization/quantize_mixed_precision_moe.py: fused ``fused_a`` and ``gate_up_proj``)."""
        layers: dict[str, dict] = {}
        fp8_block, w4a8 = {"quant_algo": "FP8_BLOCK_SCALES"}, {"quant_algo": "W4A8_AWQ"}
        first_dense, freq = config.get("first_k_dense_replace", 0), config.get("moe_layer_freq", 1) or 1
        for layer in range(config["num_hidden_layers"]):
            prefix = f"model.layers.{layer}"
            for n in ("fused_a" if config.get("q_lora_rank") else "q_proj", "q_b_proj", "kv_b_proj", "o_proj"):
                if n == "q_b_proj" and not config.get("q_lora_rank"):
                    continue
                layers[f"{prefix}.self_attn.{n}"] = fp8_block
            moe = config.get("n_routed_experts") and layer >= first_dense and layer % freq == 0
            if moe:
                if config.get("n_shared_experts"):
                    for n in ("gate_up_proj", "down_proj"):
                        layers[f"{prefix}.mlp.shared_experts.{n}"] = fp8_block
                layers[f"{prefix}.mlp.experts"] = w4a8
            else:
                for n in ("gate_up_proj", "down_proj"):
                    layers[f"{prefix}.mlp.{n}"] = fp8_block
        return {
            "hf_quant_config.json": {"quantization": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None}},
            "quant_cfg.json": {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None,
                               "quantized_layers": layers},
        }

    # ---- what it cannot express --------------------------------------------------------------------
    def check_model(self, config, linears: Iterable[str], targets: Iterable[str], group_size: int | None,
                    copy_mtp: bool) -> None:
        """Refuse, with the fix, a model or setting this layout cannot express (ValueError)."""
        archs = list(getattr(config, "architectures", None) or [])
        if not any(a in ARCHITECTURES for a in archs):
            raise ValueError(f"format w4afp8 is DeepSeek-V3's layout (architectures {list(ARCHITECTURES)}), this model "
                             f"is {archs or getattr(config, 'model_type', '?')}; use scheme.format=compressed-tensors")
        if group_size != GROUP_SIZE:
            raise ValueError(f"format w4afp8 needs scheme.group_size={GROUP_SIZE} (the engines' int4 MoE kernels), "
                             f"got {group_size}; set scheme.group_size={GROUP_SIZE} or use format=compressed-tensors")
        if copy_mtp:
            raise ValueError("format w4afp8 writes the multi-token-prediction layer nowhere (the engines expect its "
                             "experts int4): set model.copy_mtp=false, or use format=compressed-tensors")
        targets = set(targets)
        experts = {n for n in linears if EXPERT_RE.match(n)}
        left = sorted(experts - targets)
        if left:
            raise ValueError(f"format w4afp8 needs every routed expert int4, but scheme.ignore_layers leaves "
                             f"{len(left)} unquantized (e.g. {left[0]}); remove the pattern that matches them")
        extra = sorted(targets - experts)
        if extra:
            raise ValueError(f"format w4afp8 writes int4 for routed experts only and block FP8 for the other decoder "
                             f"Linears, but {len(extra)} other Linear(s) would be int4 (e.g. {extra[0]}); ignore them "
                             "as conf/scheme/w4a8.yaml does (lm_head, self_attn, shared_experts, dense mlp)")
