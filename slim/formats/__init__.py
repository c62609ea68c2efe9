"""Checkpoint formats: how quantized Linears are laid out in safetensors and described in config.json.

    FORMATS["compressed-tensors"]  default; fp8_static (float-quantized), w4a8 / w4a8_dynamic (pack-quantized)
    FORMATS["fp8_native"]          vLLM/DeepSeek ``quant_method: fp8``, per-tensor static; fp8_static only
    FORMATS["w4afp8"]              DeepSeek W4AFP8 (SGLang, TensorRT-LLM): int4 experts + block-FP8 rest; w4a8 only

Which W4A8 to pick: vLLM serves int4 weights with FP8 activations only when the activations are
*dynamic per-token* (``w4a8_dynamic``: Hopper, group_size 128). ``w4a8`` (static per-tensor FP8
activations, the seed's scheme) has no vLLM scheme in compressed-tensors; ``format=w4afp8`` writes it in the
layout SGLang and TensorRT-LLM serve (``slim.formats.w4afp8``, docs/w4afp8.md).
``slim.formats.vllm_rules`` restates vLLM's selection rules so this can be checked without a GPU.
"""

from __future__ import annotations

from slim.formats.base import (
    ROUTER_IGNORE,
    SCHEMES,
    Format,
    check_group_size,
    check_quantized,
    quantized_modules,
    resolve_scheme,
)
from slim.formats.compressed_tensors import CompressedTensorsFormat
from slim.formats.fp8_native import Fp8NativeFormat
from slim.formats.w4afp8 import W4AFp8Format

DEFAULT_FORMAT = "compressed-tensors"

FORMATS: dict[str, Format] = {
    "compressed-tensors": CompressedTensorsFormat(),
    "fp8_native": Fp8NativeFormat(),
    "w4afp8": W4AFp8Format(),
}


def detect_format(quantization_config: dict | None) -> Format | None:
    """The slim format that wrote a checkpoint, from its config.json ``quantization_config``.

    None: not a slim layout (no quantization, or DeepSeek's block-FP8 source with ``weight_block_size``).
    """
    if not quantization_config:
        return None
    method = quantization_config.get("quant_method")
    if method == "compressed-tensors":
        return FORMATS["compressed-tensors"]
    if method == "fp8":
        return FORMATS["fp8_native"] if quantization_config.get("weight_block_size") is None else None
    if method == "w4afp8":
        return FORMATS["w4afp8"]
    raise ValueError(
        f"quantization_config.quant_method={method!r}: slim reads compressed-tensors, fp8 and w4afp8 checkpoints"
    )


def get_format(name: str) -> Format:
    """``FORMATS[name]`` with an error listing the valid names."""
    if name not in FORMATS:
        raise ValueError(f"unknown checkpoint format {name!r}; valid formats: {', '.join(FORMATS)}")
    return FORMATS[name]


__all__ = [
    "DEFAULT_FORMAT",
    "FORMATS",
    "ROUTER_IGNORE",
    "SCHEMES",
    "CompressedTensorsFormat",
    "Format",
    "Fp8NativeFormat",
    "W4AFp8Format",
    "check_group_size",
    "check_quantized",
    "detect_format",
    "get_format",
    "quantized_modules",
    "resolve_scheme",
]
