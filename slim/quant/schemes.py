"""Quantization schemes as data: what a scheme does to one Linear, described by compressed-tensors' own models.

A :class:`Scheme` is a name plus two ``compressed_tensors.quantization.QuantizationArgs``: the weights' (type,
bits, strategy, group size) and the input activations' (FP8, static per tensor or dynamic per token), exactly the
fields a compressed-tensors ``QuantizationScheme`` holds. Behaviour dispatches on that data through registries:

    WEIGHT_HANDLERS[(type, strategy, num_bits)]   how weights are quantized, dequantized and sized
    SCHEMES[name]                                 the built-in presets (``conf/scheme/*.yaml`` name them)

A preset is one YAML file under ``conf/scheme/`` (its ``weights`` and ``input_activations`` blocks, built by
:func:`scheme_from_config`); a new weight strategy is one handler here plus the tensors its formats store.

``fp8_static``   FP8 e4m3 weight, one scale per tensor; FP8 activations, one static scale per tensor.
``w4a8``         int4 symmetric weight per group of ``group_size`` input channels; FP8 static per-tensor
                 activations (the seed's W4A8).
``w4a8_dynamic`` the same weights with FP8 dynamic per-token activations (what vLLM's int4 + FP8 path serves).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy, QuantizationType

from slim.quant import fp8, int4
from slim.quant.observers import WEIGHT_OBSERVERS
from slim.quant.types import QuantizedLinear


@dataclass(frozen=True)
class WeightHandler:
    """One weight strategy: how a [out, in] weight becomes codes + scales, and back.

    quantize(weight fp32 [out, in], observer, group_size, scale_dtype, weight_amax) -> (codes, scale)
    dequantize(q, dtype) -> weight [out, in]
    """

    quantize: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    dequantize: Callable[[QuantizedLinear, torch.dtype], torch.Tensor]
    per_group: bool


def _fp8_round_trip(groups: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """groups [..., g] quantized to FP8 with scale clip / 448 and back."""
    return fp8.fake_quantize_fp8(groups, fp8.fp8_scale(clip)[..., None])


def _int4_round_trip(groups: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """groups [..., g] quantized to int4 with scale clip / 7.5 and back."""
    scale = int4.int4_scale(clip)
    return int4.round_groups(groups, scale) * scale[..., None]


def _fp8_tensor(w: torch.Tensor, observe, group_size, scale_dtype, weight_amax) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3, one scale per tensor: ``amax / 448`` (``weight_amax``: the whole tensor's, when ``w`` is a block
    of its rows)."""
    amax = observe(w.reshape(1, -1), _fp8_round_trip) if weight_amax is None else weight_amax.float()
    scale = fp8.fp8_scale(amax.reshape(1))  # one group: the tensor
    return fp8.quantize_fp8(w, scale), scale


def _int4_group(w: torch.Tensor, observe, group_size, scale_dtype, weight_amax) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 symmetric per group of ``group_size`` input channels: ``absmax_g / 7.5``, rounded to the format's
    ``scale_dtype`` before the codes are computed (what is written is what was simulated)."""
    groups = int4.group_view(w, group_size)  # [out, G, g]
    scale = int4.int4_scale(observe(groups, _int4_round_trip))  # [out, G] fp32
    if scale_dtype is not None:
        scale = scale.to(scale_dtype)
    return int4.quantize_groups(groups, scale), scale


WEIGHT_HANDLERS: dict[tuple[str, str, int], WeightHandler] = {
    ("float", "tensor", 8): WeightHandler(
        quantize=_fp8_tensor,
        dequantize=lambda q, dtype: fp8.dequantize_fp8(q.weight, q.weight_scale, dtype),
        per_group=False,
    ),
    ("int", "group", 4): WeightHandler(
        quantize=_int4_group,
        dequantize=lambda q, dtype: int4.dequantize_int4(q.weight, q.weight_scale, q.group_size, dtype),
        per_group=True,
    ),
}


def weight_key(args: QuantizationArgs) -> tuple[str, str, int]:
    """(type, strategy, bits) of one side of a scheme: the key of :data:`WEIGHT_HANDLERS`."""
    return str(getattr(args.type, "value", args.type)), str(getattr(args.strategy, "value", args.strategy)), \
        int(args.num_bits)


@dataclass(frozen=True)
class Scheme:
    """A named pair of compressed-tensors ``QuantizationArgs`` (see module docstring)."""

    name: str
    weights: QuantizationArgs
    input_activations: QuantizationArgs | None

    def __post_init__(self) -> None:
        if weight_key(self.weights) not in WEIGHT_HANDLERS:
            known = ", ".join(f"{t}/{s}/{b}-bit" for t, s, b in WEIGHT_HANDLERS)
            raise ValueError(f"scheme {self.name}: no weight handler for {'/'.join(map(str, weight_key(self.weights)))}"
                             f"-bit weights; slim quantizes {known}")
        a = self.input_activations
        if a is not None and (weight_key(a)[0], weight_key(a)[2]) != ("float", 8):
            raise ValueError(f"scheme {self.name}: activations are quantized to FP8 (type float, 8 bits) or not at "
                             f"all, got {a.type} {a.num_bits}-bit")

    @property
    def handler(self) -> WeightHandler:
        return WEIGHT_HANDLERS[weight_key(self.weights)]

    @property
    def weight_bits(self) -> int:
        return int(self.weights.num_bits)

    @property
    def per_group(self) -> bool:
        return self.handler.per_group

    @property
    def static_activations(self) -> bool:
        return self.input_activations is not None and not self.input_activations.dynamic

    def quantize(
        self,
        weight: torch.Tensor,  # [out, in], any float dtype
        input_amax: torch.Tensor | None,  # fp32 scalar from calibration (static activations)
        group_size: int | None = None,
        weight_observer: str = "minmax",
        group_scale_dtype: torch.dtype | None = None,
        weight_amax: torch.Tensor | None = None,
    ) -> QuantizedLinear:
        """Quantize one Linear. ``group_scale_dtype``: the dtype the format stores group scales in; scales are
        rounded to it *before* the codes are computed, so what is written is what was simulated.
        ``weight_amax``: for per-tensor weights with the minmax observer, the whole weight's absmax when
        ``weight`` is a block of its rows (``slim.quant.blockwise``)."""
        if weight_observer not in WEIGHT_OBSERVERS:
            raise ValueError(f"unknown weight observer {weight_observer!r}; choose one of: {', '.join(WEIGHT_OBSERVERS)}")
        if weight_amax is not None and (self.per_group or weight_observer != "minmax"):
            raise ValueError("weight_amax stands for the minmax observer of a per-tensor weight only")
        if self.per_group and group_size is None:
            raise ValueError(f"scheme {self.name} quantizes per group: pass group_size")
        codes, scale = self.handler.quantize(weight.float(), WEIGHT_OBSERVERS[weight_observer], group_size,
                                             group_scale_dtype, weight_amax)
        return QuantizedLinear(codes, scale, self.input_scale(input_amax), self.weight_bits,
                               group_size if self.per_group else None)

    def input_scale(self, input_amax: torch.Tensor | None) -> torch.Tensor | None:
        """The static per-tensor FP8 activation scale ``amax / 448`` (fp32 [1]); None for dynamic activations."""
        if not self.static_activations:
            return None
        if input_amax is None:
            raise ValueError(f"{self.name} needs an input amax from calibration")
        return fp8.fp8_scale(input_amax.reshape(1))


def _args(**fields: Any) -> QuantizationArgs:
    return QuantizationArgs(symmetric=True, **fields)


FP8_WEIGHTS = _args(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR, dynamic=False)
INT4_GROUP_WEIGHTS = _args(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP, group_size=128,
                           dynamic=False)
FP8_STATIC_ACTIVATIONS = _args(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TENSOR,
                               dynamic=False)
FP8_DYNAMIC_ACTIVATIONS = _args(num_bits=8, type=QuantizationType.FLOAT, strategy=QuantizationStrategy.TOKEN,
                                dynamic=True)

SCHEMES: dict[str, Scheme] = {
    "fp8_static": Scheme("fp8_static", FP8_WEIGHTS, FP8_STATIC_ACTIVATIONS),
    "w4a8": Scheme("w4a8", INT4_GROUP_WEIGHTS, FP8_STATIC_ACTIVATIONS),
    "w4a8_dynamic": Scheme("w4a8_dynamic", INT4_GROUP_WEIGHTS, FP8_DYNAMIC_ACTIVATIONS),
}


def _fields(block: Any) -> dict[str, Any]:
    """A config block (typed dataclass or mapping) as QuantizationArgs keyword arguments."""
    return dataclasses.asdict(block) if dataclasses.is_dataclass(block) else dict(block)


def scheme_from_config(cfg) -> Scheme:
    """The :class:`Scheme` a ``scheme`` config describes: its ``weights`` / ``input_activations`` blocks (fields of
    ``QuantizationArgs``; null activations = weight-only), or, where a config has no ``weights`` block, the
    built-in preset of its name. A preset's group size is ``scheme.group_size`` (the seed key)."""
    if cfg.weights is None:
        if cfg.name not in SCHEMES:
            raise ValueError(f"scheme.name={cfg.name!r} is no built-in preset ({', '.join(SCHEMES)}) and the config "
                             "has no scheme.weights block to define it")
        base = SCHEMES[cfg.name]
        return Scheme(cfg.name, base.weights.model_copy(update={"group_size": cfg.group_size}) if base.per_group
                      else base.weights, base.input_activations)
    weights = QuantizationArgs(**{**_fields(cfg.weights), "group_size": cfg.group_size})
    acts = None if cfg.input_activations is None else QuantizationArgs(**_fields(cfg.input_activations))
    return Scheme(cfg.name, weights, acts)


def handler_of(q: QuantizedLinear) -> WeightHandler:
    """The handler that produced ``q``: its bit width, and whether it has groups."""
    for (_, _, bits), handler in WEIGHT_HANDLERS.items():
        if bits == q.weight_bits and handler.per_group == (q.group_size is not None):
            return handler
    raise ValueError(f"no weight handler for {q.weight_bits}-bit weights "
                     f"{'per group' if q.group_size is not None else 'per tensor'}")


def dequantize_weight(q: QuantizedLinear, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``q`` encodes, [out, in] (fp32 math, one cast to ``dtype``)."""
    return handler_of(q).dequantize(q, dtype)
