"""A small pure-python restatement of how vLLM decides to serve our configs (no vLLM import).

Restated from vLLM's source (github.com/vllm-project/vllm, main branch) so that tests, and the
exporter's warnings, can say what vLLM will do with a ``quantization_config`` without a GPU:

- ``vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``:
  ``CompressedTensorsConfig._quantization_scheme_map_from_config``, ``_is_fp8_w8a8``,
  ``_is_static_tensor_w8a8``, ``_is_dynamic_token_w8a8``, ``_is_fp8_w4a8`` / ``_is_fp8_w4a8_sm90``,
  ``_is_dynamic_token_w4a8_int``, ``_is_fp8_w8a16``, ``_is_wNa16_group_channel``, ``_get_scheme_from_parts``
- ``.../compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py``:
  ``CompressedTensorsMoEMethod.get_moe_method``
- ``.../compressed_tensors/schemes/compressed_tensors_w4a8_fp8.py``: ``CompressedTensorsW4A8Fp8.__init__``;
  ``.../kernels/mixed_precision/cutlass.py``: ``CutlassW4A8LinearKernel.can_implement``;
  ``.../compressed_tensors_moe/compressed_tensors_moe_w4a8_fp8.py``: ``CompressedTensorsW4A8Fp8MoEMethod``
- ``.../compressed_tensors/utils.py``: ``is_activation_quantization_format``, ``should_ignore_layer``
- ``.../quantization/fp8.py``: ``Fp8Config.from_config`` / ``Fp8Config.__init__``

Branches for FP4 (nvfp4/mxfp4) and 2:4 sparsity are left out: our configs never produce them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

HOPPER = 90  # H100 / H200 / H20: compute capability 9.0
WNA16_SUPPORTED_BITS = (4, 8)  # schemes/compressed_tensors_wNa16.py
_ACTIVATION_QUANTIZATION_FORMATS = (
    "naive-quantized",
    "int-quantized",
    "float-quantized",
    "nvfp4-pack-quantized",
)
_FP8_WEIGHT_STRATEGIES = (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL, QuantizationStrategy.BLOCK)
Args = QuantizationArgs | None


def is_activation_quantization_format(fmt: str | None) -> bool:
    return fmt in _ACTIVATION_QUANTIZATION_FORMATS


def is_static_tensor_w8a8(w: QuantizationArgs, a: QuantizationArgs) -> bool:
    is_8_bits = w.num_bits == a.num_bits == 8
    weight_strategy = w.strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL)
    is_tensor = weight_strategy and a.strategy == QuantizationStrategy.TENSOR
    is_static = not w.dynamic and not a.dynamic
    return is_8_bits and is_tensor and w.symmetric and is_static


def is_dynamic_token_w8a8(w: QuantizationArgs, a: QuantizationArgs) -> bool:
    is_8_bits = w.num_bits == a.num_bits == 8
    weight_strategy = w.strategy in (QuantizationStrategy.TENSOR, QuantizationStrategy.CHANNEL)
    is_token = weight_strategy and a.strategy == QuantizationStrategy.TOKEN
    return is_8_bits and is_token and w.symmetric and not w.dynamic and bool(a.dynamic)


def is_dynamic_token_w4a8_int(w: QuantizationArgs, a: QuantizationArgs) -> bool:
    weight_strategy = w.strategy in (QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL)
    is_token = weight_strategy and a.strategy == QuantizationStrategy.TOKEN
    is_dynamic = not w.dynamic and bool(a.dynamic)
    return w.num_bits == 4 and a.num_bits == 8 and is_token and w.symmetric and is_dynamic


def is_fp8_w8a8(w: Args, a: Args) -> bool:
    if w is None or a is None:
        return False
    is_floating_point = w.type == QuantizationType.FLOAT and a.type == QuantizationType.FLOAT
    weight_strategy = w.strategy in _FP8_WEIGHT_STRATEGIES
    if not (is_floating_point and w.symmetric and not w.dynamic and weight_strategy):
        return False
    if a.dynamic:  # "Dynamic quantization is always supported if weights supported."
        return True
    return a.symmetric and a.strategy == QuantizationStrategy.TENSOR


def is_fp8_w4a8(w: Args, a: Args) -> bool:
    # Note: vLLM does not check a.type here; the kernel always quantizes activations to FP8 e4m3.
    if not w or not a:
        return False
    is_token = w.strategy == QuantizationStrategy.GROUP and a.strategy == QuantizationStrategy.TOKEN
    is_dynamic = not w.dynamic and bool(a.dynamic)
    is_symmetric = w.symmetric and a.symmetric
    return w.num_bits == 4 and a.num_bits == 8 and is_token and is_symmetric and is_dynamic


def is_fp8_w4a8_sm90(w: Args, a: Args, capability: int | None = HOPPER) -> bool:
    return capability == HOPPER and is_fp8_w4a8(w, a)  # match_exact=True: SM90 only


def is_fp8_w8a16(w: Args, a: Args) -> bool:
    if w is None or w.type != QuantizationType.FLOAT:
        return False
    weight_strategy = w.strategy in _FP8_WEIGHT_STRATEGIES
    return w.symmetric and not w.dynamic and weight_strategy


def is_wNa16_group_channel(w: QuantizationArgs, a: Args) -> bool:
    is_channel_group = w.strategy in (QuantizationStrategy.CHANNEL, QuantizationStrategy.GROUP)
    return is_channel_group and a is None and not w.dynamic


def scheme_map(config: dict) -> dict[str, tuple[QuantizationArgs, Args, str | None]]:
    """``_quantization_scheme_map_from_config``: target -> (weights, input_activations, format)."""
    out = {}
    for group in config.get("config_groups", {}).values():
        fmt = group.get("format")
        act_format = is_activation_quantization_format(fmt if fmt is not None else config.get("format"))
        weights = QuantizationArgs.model_validate(group.get("weights"))
        inputs = group.get("input_activations")
        # "w4a8fp8 is in packed-quantized format but needs input activation quantization"
        parsed = QuantizationArgs.model_validate(inputs) if (act_format or inputs) and inputs else None
        for target in group["targets"]:
            out[target] = (weights, parsed, fmt if fmt is not None else config.get("format"))
    return out


def should_ignore_layer(layer_name: str, ignore: Sequence[str]) -> bool:
    """Exact name or ``re:`` regex (``re.match``); fused-layer shard handling is not restated."""
    return any(re.match(t[3:], layer_name) if t.startswith("re:") else t == layer_name for t in ignore)


def linear_scheme(
    config: dict, layer_name: str = "model.layers.0.mlp.down_proj", capability: int | None = HOPPER
) -> str | None:
    """Class name of the ``CompressedTensorsScheme`` vLLM builds for a Linear (``_get_scheme_from_parts``).

    ``capability`` is the GPU's compute capability (90 = Hopper), None on CPU. Returns None when the
    layer is ignored (served unquantized); raises like vLLM when no scheme matches.
    """
    if should_ignore_layer(layer_name, config.get("ignore", [])):
        return None
    w, a, fmt = scheme_map(config)["Linear"]
    if is_fp8_w4a8_sm90(w, a, capability):
        if w.group_size != 128 or w.strategy != QuantizationStrategy.GROUP:  # CompressedTensorsW4A8Fp8.__init__
            raise ValueError("W4A8 kernels require group quantization with group size 128")
        return "CompressedTensorsW4A8Fp8"
    if is_wNa16_group_channel(w, a) and fmt == "pack-quantized" and w.num_bits in WNA16_SUPPORTED_BITS:
        return "CompressedTensorsWNA16"
    if is_activation_quantization_format(fmt):
        if is_fp8_w8a8(w, a):
            fp8_supported = capability is not None and capability >= 89  # _check_scheme_supported(89)
            return "CompressedTensorsW8A8Fp8" if fp8_supported else "CompressedTensorsW8A16Fp8"
        if is_fp8_w8a16(w, a):
            return "CompressedTensorsW8A16Fp8"
        if is_static_tensor_w8a8(w, a) or is_dynamic_token_w8a8(w, a):
            return "CompressedTensorsW8A8Int8"
        if is_dynamic_token_w4a8_int(w, a):
            return "CompressedTensorsW4A8Int"
    raise NotImplementedError("No compressed-tensors compatible scheme was found.")


def moe_method(
    config: dict, layer_name: str = "model.layers.3.mlp.experts", capability: int | None = HOPPER
) -> str:
    """Class name of the FusedMoE method vLLM picks (``CompressedTensorsMoEMethod.get_moe_method``).

    Note the W4A8 order: off Hopper, int4-group + dynamic-token-8-bit activations fall through to
    ``_is_dynamic_token_w4a8_int`` (it does not check the activation type), whose method is CPU-only
    and loads unpacked int8 ``weight``s, not ``weight_packed``.
    """
    ignore = config.get("ignore", [])
    shards = [f"{layer_name}.0.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    if all(should_ignore_layer(s, ignore) for s in shards):
        return "UnquantizedFusedMoEMethod"
    if any(should_ignore_layer(s, ignore) for s in shards):
        raise ValueError("All MoE projections need to have same quantization scheme but found multiple")
    w, a, fmt = scheme_map(config)["Linear"]  # "Linear" targets also match FusedMoE
    if is_wNa16_group_channel(w, a):
        if fmt != "pack-quantized" or w.num_bits not in WNA16_SUPPORTED_BITS:
            raise ValueError("For Fused MoE layers, only format pack-quantized and bits 4/8 are supported")
        return "CompressedTensorsWNA16MoEMethod"
    if is_fp8_w8a8(w, a):
        per_tensor = w.strategy == QuantizationStrategy.TENSOR and a.strategy == QuantizationStrategy.TENSOR
        per_channel = w.strategy == QuantizationStrategy.CHANNEL and a.strategy == QuantizationStrategy.TOKEN
        if not (per_tensor or per_channel) and w.strategy != QuantizationStrategy.BLOCK:
            raise AssertionError("CompressedTensorsW8A8Fp8MoEMethod: unsupported weight strategy")
        if not a.dynamic and per_channel:
            raise ValueError(
                "For FP8 Fused MoE layer, we require either per tensor or channelwise, dynamic per token"
            )
        return "CompressedTensorsW8A8Fp8MoEMethod"
    if is_dynamic_token_w8a8(w, a):
        return "CompressedTensorsW8A8Int8MoEMethod"
    if is_fp8_w4a8_sm90(w, a, capability):
        if not w.symmetric or w.group_size != 128:  # CompressedTensorsW4A8Fp8MoEMethod.__init__ asserts
            raise AssertionError("Only symmetric group size 128 supported for W4A8 MoE")
        return "CompressedTensorsW4A8Fp8MoEMethod"
    if is_dynamic_token_w4a8_int(w, a):
        if capability is not None:  # CompressedTensorsW4A8Int8MoEMethod.__init__
            raise ValueError("CompressedTensorsW4A8Int8MoEMethod is CPU-only.")
        return "CompressedTensorsW4A8Int8MoEMethod"
    raise RuntimeError(f"Unsupported FusedMoe scheme: {w}, {a}")


def w4a8_fp8_shape_problems(out_features: int, in_features: int, moe: bool = False) -> list[str]:
    """Shape limits of the CUTLASS W4A8 kernels: K, N % 128 (linear), hidden/intermediate % 256 (MoE)."""
    m = 256 if moe else 128
    sizes = (("out_features", out_features), ("in_features", in_features))
    return [f"{name}={size} is not divisible by {m}" for name, size in sizes if size % m]


def fp8_config_from_config(config: dict) -> dict:
    """``Fp8Config.from_config`` + ``__init__`` checks; returns the parsed fields."""
    quant_method = config["quant_method"]
    serialized = "fp8" in quant_method
    activation_scheme = config["activation_scheme"]
    ignored_layers = config.get("ignored_layers") or config.get("modules_to_not_convert") or []
    block = config.get("weight_block_size")
    if activation_scheme not in ("static", "dynamic"):
        raise ValueError(f"Unsupported activation scheme {activation_scheme}")
    if block is not None:
        if not serialized or len(block) != 2 or activation_scheme != "dynamic":
            raise ValueError("The block-wise quantization only supports dynamic activation scheme for now")
    return {
        "is_checkpoint_fp8_serialized": serialized,
        "activation_scheme": activation_scheme,
        "ignored_layers": list(ignored_layers),
        "weight_block_size": block,
    }
