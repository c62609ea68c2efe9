"""The compressed-tensors checkpoint format (the default): what vLLM and transformers read.

Per quantized Linear ``<m>``:
    fp8_static  (``float-quantized``): <m>.weight fp8 [out, in], <m>.weight_scale fp32 [1],
                                       <m>.input_scale fp32 [1]
    w4a8*       (``pack-quantized``):  <m>.weight_packed int32 [out, ceil(in / 8)] (8 int4 codes per word,
                                       code + 8 in bits 4i..4i+3, compressed-tensors' ``pack_to_int32``),
                                       <m>.weight_scale [out, in // group] in ``group_scale_dtype``,
                                       <m>.weight_shape int64 [2] = (out, in),
                                       <m>.input_scale fp32 [1] for the static variant only

Group scales are stored in the model dtype (bf16 by default) because that is what both sides use:
compressed-tensors creates scales in the observed weight's dtype (``initialize_qparams``) and vLLM's
W4A8-FP8 linear scheme and MoE method allocate ``weight_scale`` in ``params_dtype`` before turning them
into FP8 group scales + fp32 channel scales (``convert_bf16_scales_to_fp8``). Casting fp32 scales on
write would change them behind the codes' back, so :meth:`CompressedTensorsFormat.tensors` refuses scales
the dtype cannot hold exactly: quantizers round ``s_g`` to ``group_scale_dtype`` first, then compute codes.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence

import compressed_tensors
import torch
from compressed_tensors.compressors import pack_to_int32, unpack_from_int32
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
)

from slim import kernels
from slim.formats.base import (
    ROUTER_IGNORE,
    SCHEMES,
    Scheme,
    check_group_size,
    check_module_name,
    dedupe,
    resolve_scheme,
    take,
)
from slim.formats.fp8_tensors import dequantize_fp8_linear, fp8_tensors, read_fp8
from slim.quant.int4 import INT4_MAX, INT4_MIN
from slim.quant.schemes import weight_key
from slim.quant.types import QuantizedLinear


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7] -> int32 [out, ceil(in / 8)], the words ``pack_to_int32(codes, 4)`` gives.

    Word j holds codes 8j..8j+7, code + 8 in bits 4i..4i+3. On a little-endian host with ``in % 8 == 0``
    those are bytes ``(c[2k] + 8) | (c[2k+1] + 8) << 4`` read as int32, which this builds with a few byte-wide
    passes (compressed-tensors' general packer widens every code to int32 and scatters it); anything else
    goes to compressed-tensors. Tests compare the two bit for bit.
    """
    fused = kernels.pack_int4(codes)  # on a CPU, one pass (slim.kernels)
    if fused is not None:
        return fused[0]
    if sys.byteorder != "little" or codes.dim() != 2 or codes.shape[1] % 8:
        return pack_to_int32(codes.contiguous(), 4)
    u = codes.contiguous().view(torch.uint8) + 8  # two's complement + 8 wraps to code + 8 in 0..15
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous().view(torch.int32)


def _fp8_activations(dynamic: bool) -> QuantizationArgs:
    """FP8 e4m3 activations: static per-tensor (``input_scale``) or dynamic per-token."""
    return QuantizationArgs(
        num_bits=8,
        type=QuantizationType.FLOAT,
        strategy=QuantizationStrategy.TOKEN if dynamic else QuantizationStrategy.TENSOR,
        symmetric=True,
        dynamic=dynamic,
    )


# weight handler (slim.quant.schemes.WEIGHT_HANDLERS' key) -> compressed-tensors format of those weights. Set
# explicitly: compressed-tensors' own inference (``infer_module_format``) would pick ``int-quantized`` (unpacked int8)
# for int weights with FP8 activations, but vLLM's W4A8-FP8 scheme loads ``weight_packed``
# (``CompressedTensorsW4A8Fp8.create_weights``).
_WEIGHT_FORMATS: dict[tuple[str, str, int], CompressionFormat] = {
    ("float", "tensor", 8): CompressionFormat.float_quantized,
    ("int", "group", 4): CompressionFormat.pack_quantized,
}


def _weights(spec: Scheme, group_size: int | None) -> QuantizationArgs:
    """The scheme's weight args as one config group states them (``group_size`` only for grouped weights)."""
    w = spec.weights
    return QuantizationArgs(num_bits=w.num_bits, type=w.type, strategy=w.strategy, symmetric=w.symmetric,
                            dynamic=False, **({"group_size": group_size} if spec.per_group else {}))


class CompressedTensorsFormat:
    """compressed-tensors ``float-quantized`` (fp8_static) and ``pack-quantized`` (w4a8, w4a8_dynamic)."""

    name = "compressed-tensors"
    quantized_suffixes = ("weight", "weight_packed", "weight_scale", "weight_shape", "input_scale")
    packs_int4 = True  # weight_packed

    def __init__(self, group_scale_dtype: torch.dtype = torch.bfloat16, targets: Sequence[str] = ("Linear",)):
        self.group_scale_dtype = group_scale_dtype
        self.targets = list(targets)

    def supports(self, scheme: str | Scheme) -> bool:
        """Every weight handler slim has (FP8 per tensor, int4 per group) with static or dynamic activations."""
        return isinstance(scheme, Scheme) or scheme in SCHEMES

    # ---- tensors ---------------------------------------------------------------------------------
    def tensors(self, module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
        """On-disk tensors of one quantized Linear, keyed ``<module_name>.<suffix>``."""
        if q.weight_bits == 8:
            return fp8_tensors(module_name, q)
        if q.weight_bits == 4:
            return self._int4_tensors(module_name, q)
        raise ValueError(f"{module_name}: weight_bits={q.weight_bits}; {self.name} stores 8 (FP8) or 4 (int4)")

    def _int4_tensors(self, module_name: str, q: QuantizedLinear) -> dict[str, torch.Tensor]:
        check_module_name(module_name)
        codes = q.weight  # int8 [out, in], values in [-8, 7]
        if codes.dtype != torch.int8 or codes.dim() != 2:
            raise ValueError(
                f"{module_name}.weight must hold int4 codes as int8 [out, in], got {codes.dtype} "
                f"{tuple(codes.shape)}"
            )
        if q.packed is not None:  # packed by the kernel that computed the codes (clamped there: none out of range)
            if q.packed.dtype != torch.int32 or tuple(q.packed.shape) != (codes.shape[0], codes.shape[1] // 8):
                raise ValueError(f"{module_name}: packed int4 words must be int32 [out, in // 8], got "
                                 f"{q.packed.dtype} {tuple(q.packed.shape)} for codes {tuple(codes.shape)}")
            fused = q.packed, 0
        else:
            fused = kernels.pack_int4(codes)  # packed, and the codes out of range counted in the same pass
        if fused is None or fused[1]:  # no kernel, or codes out of range: their range, for the check and message
            lo, hi = (int(v) for v in torch.aminmax(codes)) if codes.numel() else (0, 0)
            if lo < INT4_MIN or hi > INT4_MAX:
                raise ValueError(
                    f"{module_name}: int4 codes must lie in [{INT4_MIN}, {INT4_MAX}], got [{lo}, {hi}]; "
                    "clamp them in the quantizer"
                )
        out_features, in_features = codes.shape
        if q.group_size is None:
            raise ValueError(f"{module_name}: int4 weights need group_size (the reference uses 128)")
        check_group_size(module_name, in_features, q.group_size)
        groups = in_features // q.group_size
        if tuple(q.weight_scale.shape) != (out_features, groups):
            raise ValueError(
                f"{module_name}.weight_scale has shape {tuple(q.weight_scale.shape)}, expected "
                f"{(out_features, groups)} = [out, in // group_size] for group_size {q.group_size}"
            )
        scale = q.weight_scale.to(self.group_scale_dtype)  # [out, in // group]
        if q.weight_scale.dtype != self.group_scale_dtype and not torch.equal(scale.float(), q.weight_scale.float()):
            raise ValueError(
                f"{module_name}: int4 group scales are not exactly representable in {self.group_scale_dtype}, "
                f"the dtype {self.name} stores them in (vLLM loads them in the model dtype); round them "
                f"with `s.to({self.group_scale_dtype}).float()` before computing the codes, or build "
                f"CompressedTensorsFormat(group_scale_dtype=torch.float32)"
            )
        out = {
            # int32 [out, ceil(in / 8)]
            f"{module_name}.weight_packed": fused[0] if fused is not None else pack_int4(codes),
            f"{module_name}.weight_scale": scale.contiguous(),
            f"{module_name}.weight_shape": torch.tensor([out_features, in_features], dtype=torch.int64),  # [2]
        }
        if q.input_scale is not None:
            if q.input_scale.numel() != 1:
                raise ValueError(f"{module_name}.input_scale must be per-tensor (one value)")
            out[f"{module_name}.input_scale"] = q.input_scale.reshape(1).to(torch.float32)  # fp32 [1]
        return out

    # ---- read / dequantize -----------------------------------------------------------------------
    def read(self, module_name: str, tensors: Mapping[str, torch.Tensor]) -> QuantizedLinear:
        """Inverse of :meth:`tensors` (bit-exact); other keys in ``tensors`` are ignored."""
        if f"{module_name}.weight_packed" not in tensors:
            return read_fp8(module_name, tensors, self.name)
        packed = take(tensors, module_name, "weight_packed", self.name)  # int32 [out, ceil(in/8)]
        shape = take(tensors, module_name, "weight_shape", self.name)  # [2] = (out, in)
        scale = take(tensors, module_name, "weight_scale", self.name)  # [out, in // group]
        out_features, in_features = (int(v) for v in shape.reshape(-1).tolist())
        codes = unpack_from_int32(packed, 4, torch.Size([out_features, in_features]))  # int8 [out, in]
        groups = scale.shape[-1] if scale.dim() == 2 else 0
        if scale.dim() != 2 or scale.shape[0] != out_features or groups == 0 or in_features % groups:
            raise ValueError(
                f"{module_name}.weight_scale has shape {tuple(scale.shape)}, which is not [out, in // group] "
                f"for weight_shape {(out_features, in_features)}; slim reads group-quantized int4 only"
            )
        key = f"{module_name}.input_scale"
        input_scale = tensors[key].reshape(1).to(torch.float32) if key in tensors else None
        return QuantizedLinear(
            weight=codes,
            weight_scale=scale.to(torch.float32),  # exact: bf16/fp16 -> fp32
            input_scale=input_scale,
            weight_bits=4,
            group_size=in_features // groups,
        )

    def dequantize(self, q: QuantizedLinear, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight the checkpoint encodes, [out, in]: products in fp32, then one cast to ``dtype``."""
        if q.weight_bits == 8:
            return dequantize_fp8_linear(q, dtype)
        out_features, in_features = q.weight.shape
        g = in_features // q.weight_scale.shape[-1]
        w = q.weight.float().view(out_features, in_features // g, g)  # [out, groups, g]
        w = w * q.weight_scale.float().unsqueeze(-1)  # [out, groups, 1] broadcast
        return w.reshape(out_features, in_features).to(dtype)

    # ---- config ----------------------------------------------------------------------------------
    def scheme(
        self, scheme: str | Scheme, group_size: int | None = None, dynamic_activations: bool | None = None
    ) -> QuantizationScheme:
        """The compressed-tensors ``QuantizationScheme`` (one config group) for a slim scheme."""
        spec = resolve_scheme(scheme, dynamic_activations)
        _check_group_arg(spec, group_size)
        return QuantizationScheme(
            targets=self.targets,
            weights=_weights(spec, group_size),
            input_activations=None if spec.input_activations is None  # weight-only: W4A16 / W8A16
            else _fp8_activations(not spec.static_activations),
            format=_WEIGHT_FORMATS[weight_key(spec.weights)],
        )

    def quantization_config(
        self,
        scheme: str | Scheme,
        ignore: Sequence[str],
        group_size: int | None = None,
        dynamic_activations: bool | None = None,
    ) -> dict:
        """config.json ``quantization_config``, laid out as ``ModelCompressor.update_config`` writes it.

        ``ignore`` holds full module names as in the checkpoint, or ``re:`` regexes (vLLM matches
        each exactly or with ``re.match``); the MoE router pattern :data:`ROUTER_IGNORE` is added.
        """
        group = self.scheme(scheme, group_size, dynamic_activations)
        config = QuantizationConfig(
            config_groups={"group_0": group},
            format=group.format,
            quantization_status=QuantizationStatus.COMPRESSED,
            ignore=dedupe([*ignore, ROUTER_IGNORE]),
        )
        return {
            "version": compressed_tensors.__version__,
            "quant_method": "compressed-tensors",
            "sparsity_config": {},
            "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"}),
        }


def _check_group_arg(spec: Scheme, group_size: int | None) -> None:
    if spec.per_group and (group_size is None or group_size <= 0):
        raise ValueError(f"scheme {spec.name} needs a positive group_size (the reference uses 128)")
    if not spec.per_group and group_size is not None:
        raise ValueError(f"scheme {spec.name} is per-tensor; pass group_size=None (got {group_size})")
