"""Routed experts' static input amax before it becomes an input scale (``export.moe_input_scale``).

The engines that serve static W4A8 MoE apply one activation scale per MoE layer and projection kind: SGLang
``W4AFp8MoEMethod.process_weights_after_loading`` takes the max of ``w13_input_scale`` and of ``w2_input_scale``
over the experts a rank holds; TensorRT-LLM ``WInt4AFP8FusedMoEMethod.load_quant_scales`` the max over all experts
(w1 and w3 together). ``layer_max`` writes that max into every expert, so the checkpoint means the same thing
however experts are split over ranks; ``expert`` keeps each expert's own value.
"""

from __future__ import annotations

import torch

from slim.quant.fp8 import FP8_MAX
from slim.targets import ROUTED_EXPERT_RE

MODES = ("expert", "layer_max")


def resolve_mode(mode: str, fmt_name: str) -> str:
    """``auto`` -> ``layer_max`` for format w4afp8 (what its engines apply), ``expert`` for the others."""
    if mode == "auto":
        return "layer_max" if fmt_name == "w4afp8" else "expert"
    if mode not in MODES:
        raise ValueError(f"export.moe_input_scale={mode!r}; choose one of: auto, {', '.join(MODES)}")
    return mode


def _layer_key(name: str) -> str | None:
    """``model.layers.3.mlp.experts.7.up_proj`` -> ``model.layers.3.mlp.experts.*.gate_up``: gate and up share
    their input (and SGLang refuses w1 != w3), down has its own. None for a module that is no routed expert."""
    if not ROUTED_EXPERT_RE.search(name):
        return None
    key = ROUTED_EXPERT_RE.sub(".experts.*.", name)
    for proj in ("gate_proj", "up_proj"):
        if key.endswith(proj):
            return key[: -len(proj)] + "gate_up"
    return key


def layer_max(amax: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every routed expert projection's amax replaced by the max over its layer's experts (gate and up together,
    down apart); other modules unchanged."""
    groups: dict[str, torch.Tensor] = {}
    for name, a in amax.items():
        key = _layer_key(name)
        if key is not None:
            groups[key] = a.float() if key not in groups else torch.maximum(groups[key], a.float())
    return {n: groups[k] if (k := _layer_key(n)) is not None else a for n, a in amax.items()}


def representable_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The amax whose scale ``amax / 448`` is the smallest ``dtype`` value >= the observed one: the engines hold
    input scales in ``dtype`` (bf16), so the scale written must be one of its values, and rounding up never clips
    more than calibration saw. Exact: a bf16 value times 448 (3 significant bits) fits fp32's 24 bits."""
    scale = amax.float() / FP8_MAX
    down = scale.to(dtype).float()
    up = torch.nextafter(scale.to(dtype), torch.full_like(scale, float("inf")).to(dtype)).float()
    return torch.where(down >= scale, down, up) * FP8_MAX


def merge_input_amax(amax: dict[str, torch.Tensor], mode: str, dtype: torch.dtype | None
                     ) -> dict[str, torch.Tensor]:
    """The amax each module's input scale is computed from: ``layer_max`` merges experts, ``dtype`` (the format's
    ``input_scale_dtype``) rounds every scale up to that dtype's values."""
    out = layer_max(amax) if mode == "layer_max" else dict(amax)
    if dtype is not None:
        out = {n: representable_amax(a, dtype) for n, a in out.items()}
    return out
