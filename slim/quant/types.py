"""Plain containers passed between the numerics (slim.quant) and the checkpoint formats (slim.formats)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantizedLinear:
    """One quantized ``nn.Linear`` as the numerics produce it, before any on-disk packing.

    weight:        fp8 e4m3 [out, in] (``weight_bits=8``) or int8 codes in [-8, 7] [out, in] (``weight_bits=4``)
    weight_scale:  fp32; [1] per-tensor (fp8) or [out, in // group_size] per-group (int4)
    input_scale:   fp32 [1] static per-tensor FP8 activation scale, or None for dynamic activations
    group_size:    int4 group size along the input dim; None for per-tensor
    packed:        int4 only, optional: ``weight`` already packed into compressed-tensors' int32 words
                   [out, in // 8], where the CPU kernel packed them in the pass that computed the codes;
                   formats store these instead of packing ``weight`` again; ``weight`` may then be a meta
                   tensor (shape and dtype only), where the streamed weight path never stored the int8 codes
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    weight_bits: int
    group_size: int | None = None
    packed: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)  # type: ignore[return-value]
