"""Checkpoint formats: tensor layouts round-trip bit-exactly and agree with compressed-tensors itself."""

from __future__ import annotations

import pytest
import torch
from compressed_tensors.compressors import (
    FloatQuantizationCompressor,
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize
from safetensors.torch import load_file, save_file

from slim import kernels
from slim.formats import FORMATS, CompressedTensorsFormat, Format, check_group_size, check_quantized, get_format
from slim.formats import quantized_modules
from slim.formats.base import group_size_divisors
from slim.formats.compressed_tensors import pack_int4
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8, fp8_scale, quantize_fp8
from slim.quant.types import QuantizedLinear

CT = FORMATS["compressed-tensors"]
NATIVE = FORMATS["fp8_native"]
FP8_SHAPES = [(1, 1), (7, 13), (33, 65), (128, 96)]
INT4_SHAPES = [(1, 1), (7, 3), (19, 2)]  # (out, groups): in_features = groups * group_size
GROUP_SIZES = [32, 64, 128]


def make_fp8(out: int, inp: int, seed: int = 0, static: bool = True) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)  # [out, in]
    scale = fp8_scale(w.abs().amax()).reshape(1)  # fp32 [1]
    input_scale = fp8_scale(torch.tensor(3.5)).reshape(1) if static else None
    return QuantizedLinear(quantize_fp8(w, scale), scale, input_scale, weight_bits=8)


def make_int4(out: int, groups: int, group_size: int, seed: int = 0, static: bool = True,
              scale_dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
    """Codes/scales as the numerics produce them (s_g = absmax_g / 7.5), scales rounded to the storage dtype."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups, group_size, generator=g)  # [out, groups, g]
    scale = (w.abs().amax(-1) / 7.5).to(scale_dtype).float()  # [out, groups]
    codes = torch.clamp(torch.round(w / scale.unsqueeze(-1)), -8, 7).to(torch.int8).reshape(out, -1)
    input_scale = fp8_scale(torch.tensor(2.0)).reshape(1) if static else None
    return QuantizedLinear(codes, scale, input_scale, weight_bits=4, group_size=group_size)


def assert_same(a: QuantizedLinear, b: QuantizedLinear) -> None:
    """Bit-exact equality, fp8 compared through its bytes."""
    wa, wb = (x.view(torch.uint8) if x.dtype == FP8_DTYPE else x for x in (a.weight, b.weight))
    assert a.weight.dtype == b.weight.dtype and torch.equal(wa, wb)
    assert a.weight_scale.dtype == b.weight_scale.dtype == torch.float32
    assert torch.equal(a.weight_scale, b.weight_scale)
    assert (a.input_scale is None) == (b.input_scale is None)
    if a.input_scale is not None:
        assert torch.equal(a.input_scale, b.input_scale)
    assert (a.weight_bits, a.group_size) == (b.weight_bits, b.group_size)


# ---- registry -------------------------------------------------------------------------------------
def test_registry_holds_every_format_and_names_choices_on_error():
    assert set(FORMATS) == {"compressed-tensors", "fp8_native", "w4afp8"}
    assert all(isinstance(f, Format) for f in FORMATS.values())
    assert get_format("fp8_native") is NATIVE
    with pytest.raises(ValueError, match="compressed-tensors, fp8_native, w4afp8"):
        get_format("gguf")


# ---- fp8 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", [CT, NATIVE], ids=lambda f: f.name)
@pytest.mark.parametrize("shape", FP8_SHAPES)
def test_fp8_round_trip_is_bit_exact(fmt, shape):
    q = make_fp8(*shape)
    t = fmt.tensors("model.layers.0.mlp.down_proj", q)
    assert set(t) == {f"model.layers.0.mlp.down_proj.{s}" for s in ("weight", "weight_scale", "input_scale")}
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == FP8_DTYPE
    for s in ("weight_scale", "input_scale"):
        assert t[f"model.layers.0.mlp.down_proj.{s}"].dtype == torch.float32
        assert t[f"model.layers.0.mlp.down_proj.{s}"].shape == (1,)
    assert_same(fmt.read("model.layers.0.mlp.down_proj", t), q)
    expected = dequantize_fp8(q.weight, q.weight_scale, torch.float32)
    assert torch.equal(fmt.dequantize(q, torch.float32), expected)


@pytest.mark.parametrize("fmt", [CT, NATIVE], ids=lambda f: f.name)
def test_fp8_survives_safetensors(fmt, tmp_path):
    q = make_fp8(33, 65)
    save_file(fmt.tensors("lin", q), tmp_path / "m.safetensors")
    assert_same(fmt.read("lin", load_file(tmp_path / "m.safetensors")), q)


def test_fp8_dynamic_activations_write_no_input_scale():
    q = make_fp8(7, 13, static=False)
    t = CT.tensors("lin", q)
    assert "lin.input_scale" not in t
    assert CT.read("lin", t).input_scale is None
    with pytest.raises(ValueError, match="input_scale"):
        NATIVE.tensors("lin", q)


def test_fp8_reads_scalar_and_bf16_scales_of_other_writers():
    q = make_fp8(7, 13)
    t = CT.tensors("lin", q)
    t["lin.weight_scale"] = t["lin.weight_scale"].reshape(())  # AutoFP8-style 0-d scalar
    assert_same(CT.read("lin", t), q)
    t["lin.weight_scale"] = torch.ones(7, 1)  # per-channel: not a slim layout
    with pytest.raises(ValueError, match="per-tensor"):
        CT.read("lin", t)


def test_fp8_equals_compressed_tensors_float_compressor():
    q = make_fp8(33, 64)
    scheme = CT.scheme("fp8_static")
    dense = {"weight": CT.dequantize(q, torch.float32), "weight_scale": q.weight_scale,
             "input_scale": q.input_scale}
    theirs = FloatQuantizationCompressor.compress(dense, scheme)
    ours = CT.tensors("lin", q)
    assert torch.equal(theirs["weight"].view(torch.uint8), ours["lin.weight"].view(torch.uint8))
    back = FloatQuantizationCompressor.decompress({k.split(".", 1)[1]: v for k, v in ours.items()}, scheme)
    assert torch.equal(back["weight"], CT.dequantize(q, torch.float32))


# ---- int4 -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("out,groups", INT4_SHAPES)
def test_int4_round_trip_is_bit_exact(out, groups, group_size):
    q = make_int4(out, groups, group_size, seed=out + group_size)
    t = CT.tensors("m.experts.0.up_proj", q)
    inp = groups * group_size
    assert t["m.experts.0.up_proj.weight_packed"].dtype == torch.int32
    assert t["m.experts.0.up_proj.weight_packed"].shape == (out, inp // 8)
    assert t["m.experts.0.up_proj.weight_scale"].dtype == torch.bfloat16
    assert t["m.experts.0.up_proj.weight_scale"].shape == (out, groups)
    assert t["m.experts.0.up_proj.weight_shape"].tolist() == [out, inp]
    assert t["m.experts.0.up_proj.weight_shape"].dtype == torch.int64
    assert t["m.experts.0.up_proj.input_scale"].shape == (1,)
    assert_same(CT.read("m.experts.0.up_proj", t), q)


def test_int4_stores_words_the_kernel_packed_and_checks_their_shape():
    import dataclasses

    q = make_int4(16, 2, 128, seed=7)
    words = pack_int4(q.weight)
    t = CT.tensors("m.experts.0.up_proj", dataclasses.replace(q, packed=words.clone()))
    assert torch.equal(t["m.experts.0.up_proj.weight_packed"], words)
    marked = words.clone()
    marked[0, 0] ^= 1  # stored as given, not packed again from the codes
    assert torch.equal(CT.tensors("m", dataclasses.replace(q, packed=marked))["m.weight_packed"], marked)
    with pytest.raises(ValueError, match=r"packed int4 words must be int32 \[out, in // 8\]"):
        CT.tensors("m", dataclasses.replace(q, packed=words[:, :-1]))


def test_int4_survives_safetensors_without_input_scale(tmp_path):
    q = make_int4(19, 3, 64, static=False)
    t = CT.tensors("lin", q)
    assert "lin.input_scale" not in t
    save_file(t, tmp_path / "m.safetensors")
    assert_same(CT.read("lin", load_file(tmp_path / "m.safetensors")), q)


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_packing_is_compressed_tensors_packing(group_size):
    q = make_int4(13, 3, group_size)
    packed = CT.tensors("lin", q)["lin.weight_packed"]  # int32 [out, in/8]
    assert torch.equal(packed, pack_to_int32(q.weight, 4))
    assert torch.equal(unpack_from_int32(packed, 4, q.weight.shape), q.weight)
    # The definition vLLM unpacks (uint4b8): code i of a word lives in bits 4i..4i+3, offset by +8.
    nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1).reshape(q.weight.shape)
    assert torch.equal(nibbles - 8, q.weight.to(torch.int32))


@pytest.mark.parametrize("shape", [(16, 8), (5, 256), (3, 12), (1, 4)])  # the last two take the library path
@pytest.mark.parametrize("transposed", [False, True])
def test_fast_int4_packing_equals_pack_to_int32(shape, transposed):
    codes = torch.randint(-8, 8, shape[::-1] if transposed else shape, dtype=torch.int8,
                          generator=torch.Generator().manual_seed(sum(shape)))
    codes = codes.t() if transposed else codes
    codes[0, : min(16, shape[1])] = torch.arange(-8, 8, dtype=torch.int8)[: min(16, shape[1])]  # every code
    packed = pack_int4(codes)
    assert packed.dtype == torch.int32 and packed.is_contiguous()
    assert torch.equal(packed, pack_to_int32(codes.contiguous(), 4))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_equals_compressed_tensors_packed_compressor(group_size):
    q = make_int4(7, 2, group_size, static=False)
    scheme = CT.scheme("w4a8_dynamic", group_size=group_size)
    ours = {k.split(".", 1)[1]: v for k, v in CT.tensors("lin", q).items()}
    dense = {"weight": CT.dequantize(q, torch.float32), "weight_scale": ours["weight_scale"]}
    theirs = PackedQuantizationCompressor.compress(dense, scheme)
    assert set(theirs) == set(ours)
    for key in ours:
        assert torch.equal(theirs[key], ours[key]), key
    back = PackedQuantizationCompressor.decompress(ours, scheme)["weight"]  # in the scale's dtype (bf16)
    assert torch.equal(back, CT.dequantize(q, torch.bfloat16))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_int4_dequantize_equals_compressed_tensors_dequantize(group_size):
    q = make_int4(19, 3, group_size)
    args = CT.scheme("w4a8", group_size=group_size).weights
    bf16_scale = q.weight_scale.to(torch.bfloat16)
    # bf16 math in compressed-tensors rounds each product once, as our fp32-then-cast does
    assert torch.equal(ct_dequantize(q.weight, bf16_scale, args=args), CT.dequantize(q, torch.bfloat16))
    assert torch.equal(ct_dequantize(q.weight, q.weight_scale, args=args), CT.dequantize(q, torch.float32))


def test_int4_float32_scale_storage_keeps_any_scale():
    fmt = CompressedTensorsFormat(group_scale_dtype=torch.float32)
    q = make_int4(7, 2, 32, scale_dtype=torch.float32)
    t = fmt.tensors("lin", q)
    assert t["lin.weight_scale"].dtype == torch.float32
    assert_same(fmt.read("lin", t), q)
    with pytest.raises(ValueError, match=r"round them with `s.to\(torch.bfloat16\).float\(\)`"):
        CT.tensors("lin", q)


# ---- errors that name the fix ---------------------------------------------------------------------
def test_group_size_error_names_the_divisors():
    assert group_size_divisors(1000, 128) == [8, 40, 200]
    with pytest.raises(ValueError, match="group_size 128 does not divide in_features 1000 of model.layers.3.mlp"
                                         r".down_proj; use 8, 40, 200 or add it to ignore_layers"):
        check_group_size("model.layers.3.mlp.down_proj", 1000, 128)


@pytest.mark.parametrize("cpu_kernels", [True, False])  # the fused packer counts bad codes; torch checks them
def test_int4_refuses_bad_codes_and_shapes(cpu_kernels):
    kernels.configure(cpu_kernels)
    try:
        assert (kernels.library() is not None) == cpu_kernels
        q = make_int4(7, 2, 32)
        bad = q.weight.clone()
        bad[3, 40] = 8
        with pytest.raises(ValueError, match=r"must lie in \[-8, 7\], got \[-8, 8\]"):
            CT.tensors("lin", QuantizedLinear(bad, q.weight_scale, None, 4, 32))
        assert torch.equal(CT.tensors("lin", q)["lin.weight_packed"], pack_to_int32(q.weight, 4))
    finally:
        kernels.configure(None)
    q = make_int4(7, 2, 32)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        CT.tensors("lin", QuantizedLinear(q.weight * 2, q.weight_scale, None, 4, 32))
    with pytest.raises(ValueError, match=r"expected \(7, 1\)"):
        CT.tensors("lin", QuantizedLinear(q.weight, q.weight_scale, None, 4, 64))
    with pytest.raises(ValueError, match="format=compressed-tensors"):
        NATIVE.tensors("lin", q)
    with pytest.raises(ValueError, match="not its weight tensor"):
        CT.tensors("lin.weight", q)


def test_read_names_the_missing_tensor():
    t = CT.tensors("lin", make_int4(7, 2, 32))
    del t["lin.weight_shape"]
    with pytest.raises(KeyError, match="lin.weight_shape is missing"):
        CT.read("lin", t)


def test_check_quantized_matches_scheme_to_tensors():
    check_quantized("lin", make_fp8(7, 13), "fp8_static")
    check_quantized("lin", make_int4(7, 2, 128, static=False), "w4a8_dynamic", group_size=128)
    with pytest.raises(ValueError, match="pass input_scale=None"):
        check_quantized("lin", make_int4(7, 2, 128), "w4a8_dynamic")
    with pytest.raises(ValueError, match="w4a8_dynamic"):
        check_quantized("lin", make_int4(7, 2, 128, static=False), "w4a8")
    with pytest.raises(ValueError, match="4-bit weights but scheme fp8_static"):
        check_quantized("lin", make_int4(7, 2, 128), "fp8_static")
    with pytest.raises(ValueError, match="group_size 64 but the config says 128"):
        check_quantized("lin", make_int4(7, 2, 64), "w4a8", group_size=128)


# ---- which tensors belong to a quantized module ---------------------------------------------------
def test_quantized_modules_groups_checkpoint_names():
    state = {
        **CT.tensors("model.layers.0.mlp.down_proj", make_fp8(7, 13)),
        **CT.tensors("model.layers.1.mlp.experts.0.up_proj", make_int4(7, 2, 32)),
        "model.layers.0.mlp.down_proj.bias": torch.zeros(7),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(7, 7),
        "model.embed_tokens.weight": torch.zeros(3, 7),
    }
    groups = quantized_modules(state, CT)
    assert sorted(groups) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.experts.0.up_proj"]
    assert sorted(groups["model.layers.0.mlp.down_proj"]) == [
        f"model.layers.0.mlp.down_proj.{s}" for s in ("input_scale", "weight", "weight_scale")
    ]
    assert len(groups["model.layers.1.mlp.experts.0.up_proj"]) == 4
    for module, names in groups.items():
        CT.read(module, {n: state[n] for n in names})


# ---- the contract with slim.quant.schemes ---------------------------------------------------------
@pytest.mark.parametrize("scheme", ["fp8_static", "w4a8", "w4a8_dynamic"])
def test_what_the_quantizer_produces_is_written_and_read_back_exactly(scheme):
    from slim.quant.schemes import SCHEMES, dequantize_weight

    spec = SCHEMES[scheme]
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    q = spec.quantize(weight, torch.tensor(5.0), 128 if spec.per_group else None,
                      group_scale_dtype=CT.group_scale_dtype)
    check_quantized("lin", q, scheme, 128 if spec.per_group else None)
    back = CT.read("lin", CT.tensors("lin", q))
    assert torch.equal(CT.dequantize(back, torch.float32), dequantize_weight(q, torch.float32))
