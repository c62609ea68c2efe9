"""What every checkpoint format shares: scheme lookup, the Format protocol, and the checks.

A *format* turns one :class:`~slim.quant.types.QuantizedLinear` into the tensors stored under its
module name (``tensors``), reads them back bit-exactly (``read``), dequantizes (``dequantize``) and
writes the ``quantization_config`` block of ``config.json``. Adding a format is one entry in
``slim.formats.FORMATS``; schemes come from ``slim.quant.schemes.SCHEMES`` (one registry for both).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from slim.quant.schemes import SCHEMES, Scheme
from slim.quant.types import QuantizedLinear

# DeepSeek's MoE router ``mlp.gate`` holds a [n_experts, hidden] weight but is not a Linear to quantize.
# compressed-tensors maps router/gate classes to "Linear" when matching targets
# (``quant_config.get_vllm_module_type``), so llm-compressor always ignores it with this pattern.
ROUTER_IGNORE = "re:.*mlp.gate$"


def dynamic_twin(spec: Scheme) -> Scheme | None:
    """The preset with the same kind of weights and the other activation mode (w4a8 <-> w4a8_dynamic), if any."""
    return next(
        (s for s in SCHEMES.values() if s.handler == spec.handler and s.static_activations != spec.static_activations),
        None,
    )


def resolve_scheme(scheme: str | Scheme, dynamic_activations: bool | None = None) -> Scheme:
    """A :class:`Scheme` as given, or a preset looked up in ``slim.quant.schemes.SCHEMES`` by name;
    ``dynamic_activations=True`` turns ``w4a8`` into ``w4a8_dynamic`` (and False the reverse)."""
    if isinstance(scheme, Scheme):
        spec = scheme
    elif scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    else:
        spec = SCHEMES[scheme]
    if dynamic_activations is None or dynamic_activations != spec.static_activations:
        return spec
    twin = dynamic_twin(spec)
    if twin is not None:
        return twin
    static = [s.name for s in SCHEMES.values() if s.static_activations]
    dynamic = [s.name for s in SCHEMES.values() if not s.static_activations]
    raise ValueError(
        f"scheme {spec.name!r} has {'static' if spec.static_activations else 'dynamic'} activations but "
        f"dynamic_activations={dynamic_activations}; static-activation schemes: {', '.join(static)}; "
        f"dynamic-activation schemes: {', '.join(dynamic)}"
    )


def group_size_divisors(in_features: int, group_size: int, count: int = 3) -> list[int]:
    """Up to ``count`` multiples of 8 dividing ``in_features`` (not itself), nearest to ``group_size``."""
    options = [d for d in range(8, in_features, 8) if in_features % d == 0]
    return sorted(sorted(options, key=lambda d: (abs(d - group_size), d))[:count])


def check_group_size(module_name: str, in_features: int, group_size: int) -> None:
    """Fail with the fix when ``group_size`` does not split ``in_features`` into whole groups."""
    if group_size <= 0 or in_features % group_size:
        options = group_size_divisors(in_features, max(group_size, 1))
        hint = f"use {', '.join(map(str, options))} or " if options else ""
        raise ValueError(
            f"group_size {group_size} does not divide in_features {in_features} of {module_name}; "
            f"{hint}add it to ignore_layers"
        )


def check_module_name(module_name: str) -> None:
    """Module names are the Linear's path, e.g. ``model.layers.0.mlp.down_proj``."""
    if not module_name or module_name.endswith(".weight"):
        raise ValueError(
            f"expected a module name such as 'model.layers.0.mlp.down_proj', got {module_name!r} "
            "(pass the Linear's name, not its weight tensor's name)"
        )


def check_quantized(module_name: str, q: QuantizedLinear, scheme: str | Scheme, group_size: int | None = None) -> None:
    """Fail with the fix when ``q`` does not hold what ``scheme`` stores (bits, groups, input_scale)."""
    spec = resolve_scheme(scheme)
    if q.weight_bits != spec.weight_bits:
        raise ValueError(
            f"{module_name} is quantized to {q.weight_bits}-bit weights but scheme {spec.name} stores "
            f"{spec.weight_bits}-bit weights; quantize it with {spec.name} or add it to ignore_layers"
        )
    if spec.per_group and group_size is not None and q.group_size != group_size:
        raise ValueError(
            f"{module_name} has group_size {q.group_size} but the config says {group_size}; "
            "every quantized Linear of one checkpoint must use the config's group_size"
        )
    if not spec.static_activations and q.input_scale is not None:
        raise ValueError(
            f"{module_name} carries a static input_scale but {spec.name} computes activation scales per token "
            "at run time (vLLM has no parameter to load it into); pass input_scale=None"
        )
    if spec.static_activations and q.input_scale is None:
        twin = dynamic_twin(spec)
        raise ValueError(
            f"{module_name} has no input_scale but {spec.name} uses a static per-tensor FP8 activation scale; "
            "calibrate it (experts with no routed token take their layer's max, see calibration)"
            + (f" or use scheme {twin.name}" if twin else "")
        )


def dedupe(names: Iterable[str]) -> list[str]:
    """Keep the first occurrence of each name, in order."""
    return list(dict.fromkeys(names))


@runtime_checkable
class Format(Protocol):
    """A checkpoint layout for quantized Linears (see module docstring)."""

    name: str
    # Tensor-name suffixes (after ``<module>.``) a quantized module may own in this layout.
    quantized_suffixes: tuple[str, ...]
    # dtype int4 group scales are stored in (None: the format stores no grouped scheme). Quantizers
    # round their scales to it before computing codes so that what is written is what was simulated.
    group_scale_dtype: torch.dtype | None
    # Whether int4 weights are stored as compressed-tensors' int32 words (``pack_int4``): then a quantizer that
    # can pack them in the pass that computes the codes hands them over in ``QuantizedLinear.packed``.
    packs_int4: bool

    def supports(self, scheme: str) -> bool: ...

    def tensors(self, module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]: ...

    def read(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedLinear: ...

    def dequantize(self, q: QuantizedLinear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor: ...

    def quantization_config(
        self,
        scheme: str,
        ignore: Sequence[str],
        group_size: int | None = None,
        dynamic_activations: bool | None = None,
    ) -> dict: ...


# Every quantized module, in every format, stores ``<module>.weight_scale``; unquantized ones never do.
MARKER_SUFFIX = "weight_scale"


def quantized_modules(names: Iterable[str], fmt: Format) -> dict[str, list[str]]:
    """Group checkpoint tensor names by quantized module: ``{module: [its tensor names]}``.

    A module is quantized when ``<module>.weight_scale`` exists; it owns the names ending in one of
    ``fmt.quantized_suffixes``. Names of other modules (and biases) are left out.
    """
    own = getattr(fmt, "quantized_modules", None)  # a layout whose quantized modules carry another marker
    if own is not None:
        return own(names)
    names = list(names)
    marker = "." + MARKER_SUFFIX
    modules = {n[: -len(marker)]: [] for n in names if n.endswith(marker)}
    for n in names:
        module, _, suffix = n.rpartition(".")
        if module in modules and suffix in fmt.quantized_suffixes:
            modules[module].append(n)
    return modules


def take(tensors: Mapping[str, torch.Tensor], module_name: str, suffix: str, fmt_name: str) -> torch.Tensor:
    """``tensors[f"{module_name}.{suffix}"]`` or an error naming what is missing and what is there."""
    key = f"{module_name}.{suffix}"
    if key not in tensors:
        present = sorted(k for k in tensors if k.startswith(module_name + "."))
        raise KeyError(
            f"{key} is missing: a {fmt_name} quantized module needs it (found {present or 'nothing'} "
            f"under {module_name}); was the checkpoint written in another format?"
        )
    return tensors[key]
