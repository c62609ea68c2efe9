"""Quantization schemes: what each named scheme does to one Linear. Adding a scheme = adding one entry.

``fp8_static``   FP8 e4m3 weight, one scale per tensor; FP8 activations, one static scale per tensor.
``w4a8``         int4 symmetric weight per group of ``group_size`` input channels; FP8 static per-tensor
                 activations (the seed's W4A8; no vLLM kernel serves it).
``w4a8_dynamic`` the same weights with FP8 dynamic per-token activations (what vLLM's int4 + FP8 path serves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slim.quant import fp8, int4
from slim.quant.observers import WEIGHT_OBSERVERS
from slim.quant.types import QuantizedLinear


@dataclass(frozen=True)
class Scheme:
    name: str
    weight_bits: int
    per_group: bool
    static_activations: bool

    def quantize(
        self,
        weight: torch.Tensor,  # [out, in], any float dtype
        input_amax: torch.Tensor | None,  # fp32 scalar from calibration (static activations)
        group_size: int | None = None,
        weight_observer: str = "minmax",
        group_scale_dtype: torch.dtype | None = None,
        weight_amax: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Quantize one Linear. ``group_scale_dtype``: the dtype the format stores int4 group scales in;
        scales are rounded to it *before* the codes are computed, so what is written is what was simulated.
        ``weight_amax``: for per-tensor (FP8) weights with the minmax observer, the whole weight's absmax when
        ``weight`` is a block of its rows (``slim.quant.blockwise``)."""
        if weight_observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"unknown weight observer {weight_observer!r}; choose one of: {', '.join(WEIGHT_OBSERVERS)}")
        if weight_amax is not None and (self.weight_bits != 8 or weight_observer != "minmax"):
            raise ValueError("weight_amax stands for the minmax observer of a per-tensor (FP8) weight only")
        observe = WEIGHT_OBSERVERS[weight_observer]
        input_scale = self.input_scale(input_amax)
        if self.weight_bits == 8:
            w = weight.float()
            amax = observe(w.reshape(1, -1), _fp8_round_trip) if weight_amax is None else weight_amax.float()
            scale = fp8.fp8_scale(amax.reshape(1))  # one group: the tensor
            return QuantizedLinear(fp8.quantize_fp8(w, scale), scale, input_scale, 8)
        assert group_size is not None
        groups = int4.group_view(weight, group_size)  # [out, G, g]
        scale = int4.int4_scale(observe(groups, _int4_round_trip))  # [out, G] fp32
        if group_scale_dtype is not None:
            scale = scale.to(group_scale_dtype)
        codes = int4.quantize_groups(groups, scale)
        return QuantizedLinear(codes, scale, input_scale, 4, group_size)

    def input_scale(self, input_amax: torch.Tensor | None) -> torch.Tensor | None:
        """The static per-tensor FP8 activation scale ``amax / 448`` (fp32 [1]); None for dynamic activations."""
        if not self.static_activations:
            return None
        if input_amax is None:
            raise ValueError(f"{self.name} needs an input amax from calibration")
        return fp8.fp8_scale(input_amax.reshape(1))


def _fp8_round_trip(groups: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """groups [..., g] quantized to FP8 with scale clip / 448 and back."""
    return fp8.fake_quantize_fp8(groups, fp8.fp8_scale(clip)[..., None])


def _int4_round_trip(groups: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """groups [..., g] quantized to int4 with scale clip / 7.5 and back."""
    scale = int4.int4_scale(clip)
    return int4.round_groups(groups, scale) * scale[..., None]


SCHEMES: dict[str, Scheme] = {
    "fp8_static": Scheme("fp8_static", weight_bits=8, per_group=False, static_activations=True),
    "w4a8": Scheme("w4a8", weight_bits=4, per_group=True, static_activations=True),
    "w4a8_dynamic": Scheme("w4a8_dynamic", weight_bits=4, per_group=True, static_activations=False),
}


def dequantize_weight(q: QuantizedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if q.weight_bits == 8:
        return fp8.dequantize_fp8(q.weight, q.weight_scale, dtype)
    return int4.dequantize_int4(q.weight, q.weight_scale, q.group_size, dtype)
