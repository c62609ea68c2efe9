"""Checkpoint formats: how quantized Linears are laid out in safetensors and described in config.json.

    FORMATS["compressed-tensors"]  default; fp8_static (float-quantized), w4a8 / w4a8_dynamic (pack-quantized)
    FORMATS["fp8_native"]          vLLM/DeepSeek ``quant_method: fp8``, per-tensor static; fp8_static only

Which W4A8 to pick: vLLM serves int4 weights with FP8 activations only when the activations are
*dynamic per-token* (``w4a8_dynamic``: Hopper, group_size 128). ``w4a8`` (static per-tensor FP8
activations, the seed's scheme) is written faithfully and read back by slim, but no vLLM scheme loads it.
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

DEFAULT_FORMAT = "compressed-tensors"

FORMATS: dict[str, Format] = {
    "compressed-tensors": CompressedTensorsFormat(),
    "fp8_native": Fp8NativeFormat(),
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
    raise ValueError(
        f"quantization_config.quant_method={method!r}: slim reads compressed-tensors and fp8 checkpoints"
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
    "check_group_size",
    "check_quantized",
    "detect_format",
    "get_format",
    "quantized_modules",
    "resolve_scheme",
]
