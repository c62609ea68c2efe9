"""vLLM's native ``fp8`` layout (``quant_method: fp8``), per-tensor and static, as the reference exports.

Tensors are the shared per-tensor FP8 layout (:mod:`slim.formats.fp8_tensors`): ``weight`` fp8,
``weight_scale`` fp32 [1], ``input_scale`` fp32 [1]. That is what vLLM's ``Fp8LinearMethod.create_weights``
registers when ``weight_block_size`` is absent (``weight_scale`` and ``input_scale`` as fp32
``PerTensorScaleParameter``s), and what ``Fp8MoEMethod`` gathers per expert into ``w13_weight_scale``
[E, 2], ``w2_weight_scale`` [E], ``w13_input_scale``/``w2_input_scale`` [E] (it then takes the max input
scale over experts, so per-expert calibration is kept on disk and merged by the server).

Config: ``{"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": [...]}``, no
``weight_block_size`` (vLLM: absent = per-tensor). DeepSeek's published checkpoint uses the same
``quant_method`` with ``weight_block_size: [128, 128]`` (``weight_scale_inv`` blocks, dynamic activations);
:func:`slim.formats.detect_format` tells them apart by that key. These checkpoints are for vLLM and slim's
loader: transformers' FP8 integration cannot load them (it names per-tensor parameters
``weight_scale_inv``/``activation_scale`` and defaults a missing ``weight_block_size`` to 128x128 blocks).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from slim.formats.base import SCHEMES, Scheme, dedupe, resolve_scheme
from slim.formats.fp8_tensors import FP8_SUFFIXES, dequantize_fp8_linear, fp8_tensors, read_fp8
from slim.quant.types import QuantizedLinear


class Fp8NativeFormat:
    """``quant_method: fp8`` with static per-tensor activation scales (fp8_static only)."""

    name = "fp8_native"
    quantized_suffixes = FP8_SUFFIXES
    group_scale_dtype: torch.dtype | None = None
    packs_int4 = False  # FP8 only

    def supports(self, scheme: str | Scheme) -> bool:
        """FP8 per-tensor weights with static per-tensor FP8 activations (what ``fp8_static`` describes)."""
        spec = resolve_scheme(scheme) if isinstance(scheme, Scheme) or scheme in SCHEMES else None
        return spec is not None and spec.handler == SCHEMES["fp8_static"].handler and spec.static_activations

    def tensors(self, module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
        if q.weight_bits != 8:
            raise ValueError(
                f"{module_name}: {self.name} stores FP8 weights only, got {q.weight_bits}-bit; "
                "write w4a8 with format=compressed-tensors"
            )
        if q.input_scale is None:
            raise ValueError(
                f"{module_name}: {self.name} is written with activation_scheme 'static' and needs an "
                "input_scale; calibrate it or use format=compressed-tensors"
            )
        return fp8_tensors(module_name, q)

    def read(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedLinear:
        return read_fp8(module_name, tensors, self.name)

    def dequantize(self, q: QuantizedLinear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return dequantize_fp8_linear(q, dtype)

    def quantization_config(
        self,
        scheme: str | Scheme,
        ignore: Sequence[str],
        group_size: int | None = None,
        dynamic_activations: bool | None = None,
    ) -> dict:
        """config.json ``quantization_config`` as vLLM's ``Fp8Config.from_config`` parses it.

        ``ignore`` must be full module names: vLLM's ``is_layer_skipped`` compares names exactly
        (no regexes), and resolves fused layers (``qkv_proj``) through their unfused shard names.
        """
        spec = resolve_scheme(scheme, dynamic_activations)
        if not self.supports(spec):
            raise ValueError(
                f"format {self.name} stores fp8_static only, not {spec.name}; use format=compressed-tensors"
            )
        if group_size is not None:
            raise ValueError(f"scheme {spec.name} is per-tensor; pass group_size=None (got {group_size})")
        patterns = [name for name in ignore if name.startswith("re:")]
        if patterns:
            raise ValueError(
                f"{self.name} ignored_layers are matched by exact name in vLLM, regexes {patterns} would "
                "match nothing; expand them to module names first"
            )
        return {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": dedupe(ignore)}
