"""Load whole models for evaluation: the source checkpoint (baseline) or an exported quantized checkpoint.

Both go through the same skeleton + materialize path as quantization. A quantized checkpoint is read back
through its format (``slim.formats``) into :class:`SimQuantLinear` modules, so evaluation scores exactly the
values that ship, not the in-memory objects of the run that produced them.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from transformers import PreTrainedModel

from slim.errors import SlimError
from slim.models.adapters import build_skeleton, load_config
from slim.models.checkpoint import CheckpointReader
from slim.models.materialize import materialize_own
from slim.models.simulated import SimQuantLinear, swap_in

log = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# CPU kernel capabilities (torch.backends.cpu.get_cpu_capability()) whose bf16 matmuls run on native bf16 or
# AVX-512 units; elsewhere (AVX2, NEON without bf16, ...) a bf16 matmul is converted element by element and runs
# several times slower than float32 (see experiments/bench/NOTES.md)
NATIVE_BF16_CAPABILITIES = ("AVX512", "AVX512_BF16", "AMX", "SVE256", "SVE")


def resolve_dtype(name: str, device: str) -> str:
    """``model.dtype``: an explicit dtype as given; ``auto`` is bfloat16 on GPUs and on CPUs with native bf16 (or
    AVX-512) matmuls, float32 on other CPUs. The resolved dtype is the skeleton's, so it is the compute dtype of
    calibration and evaluation, the dtype block-FP8 weights are decoded into, and ``config.json``'s dtype."""
    if name != "auto":
        return name
    if not device.startswith("cpu"):
        return "bfloat16"
    capability = torch.backends.cpu.get_cpu_capability()
    dtype = "bfloat16" if capability.startswith(NATIVE_BF16_CAPABILITIES) else "float32"
    log.info("model.dtype=auto: computing in %s (CPU capability %s%s)", dtype, capability,
             "" if dtype == "bfloat16" else ": no native bf16 matmul; model.dtype=bfloat16 forces bf16")
    return dtype


def torch_dtype(name: str, device: str) -> torch.dtype:
    """The torch dtype of ``model.dtype`` (``auto`` resolved for ``device``)."""
    return DTYPES[resolve_dtype(name, device)]


def load_model(path: str, load_type: str = "bf16", dtype: str = "bfloat16", trust_remote_code: bool = False,
               device: str = "cpu", numerics: str = "checkpoint") -> PreTrainedModel:
    """A ready-to-run model from a checkpoint directory; quantized Linears become SimQuantLinear computing with the
    serving engine's scales (``numerics``, see slim.models.numerics; resolved, never ``auto``)."""
    from slim.formats import detect_format, quantized_modules

    config = load_config(path, trust_remote_code)
    model, adapter = build_skeleton(config, torch_dtype(dtype, device))
    qcfg = getattr(config, "quantization_config", None)
    try:
        fmt = detect_format(qcfg if isinstance(qcfg, dict) else None)
    except ValueError as exc:
        raise SlimError(f"{path}: {exc}") from None
    reader = CheckpointReader(path, load_type="fp8" if fmt is None and load_type == "fp8" else "bf16")
    adapter.open_reader(reader, config)
    if fmt is None:
        reader.check_load_type()
    else:
        read_quantized(model, reader, fmt, quantized_modules(reader.names(), fmt), numerics, model.dtype)
        if getattr(fmt, "engine_only_config", False):  # a layout transformers (and lm-eval's HFLM, which parses
            del model.config.quantization_config  # model.config.quantization_config) does not know: slim simulates it
    materialize_rest(model, reader, device)
    model.to(device)
    return model


def read_quantized(model: nn.Module, reader: CheckpointReader, fmt, modules: dict[str, list[str]], numerics: str,
                   dtype: torch.dtype, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """Swap a SimQuantLinear into ``model`` for each of ``modules`` (``{module: its tensor names}``, whole MoE
    layers and fused groups), read through ``fmt`` and transformed by ``numerics``; returns the replaced modules."""
    from slim.models.numerics import apply_numerics

    read = {name: fmt.read(name, {n: reader.raw(n) for n in names}) for name, names in modules.items()}
    replaced = {}
    for name, q in apply_numerics(numerics, read).items():
        q = replace_tensors(q, device)
        bias = reader.get(name + ".bias", dtype, device) if name + ".bias" in reader else None
        replaced[name] = swap_in(model, name, SimQuantLinear(q, bias))
    return replaced


def replace_tensors(q, device):
    """``q`` with its tensors on ``device`` (a copy off the checkpoint's memory map on the host)."""
    from dataclasses import fields, replace

    moved = {f.name: getattr(q, f.name).to(device) for f in fields(q)
             if isinstance(getattr(q, f.name), torch.Tensor) and not getattr(q, f.name).is_meta}
    return replace(q, **moved) if str(device) != "cpu" else q


def materialize_rest(model: nn.Module, reader: CheckpointReader, device: str | torch.device,
                     prefix: str = "") -> None:
    """Materialize every parameter/buffer still on the meta device (SimQuantLinear holds its own tensors);
    ``prefix``: the checkpoint name of ``model`` when it is a part of the whole (``model.layers.3.``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, SimQuantLinear):
            continue
        direct = list(mod.named_parameters(recurse=False)) + [
            (b, t) for b, t in mod.named_buffers(recurse=False) if b not in mod._non_persistent_buffers_set
        ]
        if any(t.is_meta for _, t in direct):
            materialize_own(mod, f"{prefix}{name}." if name else prefix, reader, device)
