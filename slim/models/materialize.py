"""Move modules between the meta device and real tensors read from a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from slim.errors import SlimError
from slim.models.checkpoint import CheckpointReader
from slim.quant.stats import all_finite


def materialize_own(module: nn.Module, prefix: str, reader: CheckpointReader, device: str | torch.device = "cpu") -> None:
    """Fill the module's own parameters and persistent buffers (not its children's) from ``reader``.

    Each tensor keeps the dtype the skeleton gave it (fp32 routers stay fp32); FP8 block weights are
    dequantized on read.
    """
    for pname, param in list(module.named_parameters(recurse=False)):
        tensor = reader.get(prefix + pname, param.dtype, device)
        if tensor.shape != param.shape:
            raise SlimError(
                f"{prefix + pname} has shape {tuple(tensor.shape)} in the checkpoint but the config "
                f"expects {tuple(param.shape)}; config.json and weights disagree"
            )
        if tensor.is_floating_point() and not all_finite(tensor):
            bad = int((~torch.isfinite(tensor)).sum())
            stored = reader.weight_map.get(prefix + pname, "?")
            raise SlimError(f"{prefix + pname} (in {stored}) has {bad} NaN/Inf value(s); the checkpoint is "
                            "corrupt: re-download or re-convert it")
        module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
    for bname, buf in list(module.named_buffers(recurse=False)):
        if bname not in module._non_persistent_buffers_set:
            module._buffers[bname] = reader.get(prefix + bname, buf.dtype, device)


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device: str | torch.device = "cpu") -> None:
    """Fill every parameter and persistent buffer of ``module`` and its children (names ``prefix + local``)."""
    for sub_name, sub in module.named_modules():
        materialize_own(sub, f"{prefix}{sub_name}." if sub_name else prefix, reader, device)


def release(module: nn.Module) -> None:
    """Drop the module's tensors (back to the meta device) so their memory is freed."""
    module.to(device="meta")
