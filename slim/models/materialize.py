"""Move modules between the meta device and real tensors read from a checkpoint."""

from __future__ import annotations

import torch
from torch import nn

from slim.errors import SlimError
from slim.models.checkpoint import CheckpointReader, nonfinite_error
from slim.quant.stats import all_finite


def materialize_own(module: nn.Module, prefix: str, reader: CheckpointReader, device: str | torch.device = "cpu",
                    skip: frozenset[str] = frozenset()) -> None:
    """Fill the module's own parameters and persistent buffers (not its children's) from ``reader``.

    Each tensor keeps the dtype the skeleton gave it (fp32 routers stay fp32); FP8 block weights are
    dequantized on read. Parameters named in ``skip`` (full names) stay on the meta device.
    """
    for pname, param in list(module._parameters.items()):  # the dict itself: no generator per module
        if param is None or prefix + pname in skip:
            continue
        tensor = reader.get(prefix + pname, param.dtype, device)
        check_shape(prefix + pname, tuple(tensor.shape), tuple(param.shape))
        if tensor.is_floating_point() and not all_finite(tensor):
            raise nonfinite_error(prefix + pname, int((~torch.isfinite(tensor)).sum()), reader)
        module._parameters[pname] = nn.Parameter(tensor, requires_grad=False)
    for bname, buf in list(module._buffers.items()):
        if buf is not None and bname not in module._non_persistent_buffers_set:
            module._buffers[bname] = reader.get(prefix + bname, buf.dtype, device)


def check_shape(name: str, stored: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if stored != expected:
        raise SlimError(f"{name} has shape {stored} in the checkpoint but the config expects {expected}; "
                        "config.json and weights disagree")


def materialize(module: nn.Module, prefix: str, reader: CheckpointReader, device: str | torch.device = "cpu",
                skip: frozenset[str] = frozenset()) -> None:
    """Fill every parameter and persistent buffer of ``module`` and its children (names ``prefix + local``),
    except the parameters named in ``skip``."""
    for sub_name, sub in module.named_modules():
        materialize_own(sub, f"{prefix}{sub_name}." if sub_name else prefix, reader, device, skip)


def release(module: nn.Module) -> None:
    """Drop the module's tensors (back to the meta device) so their memory is freed: what ``module.to("meta")``
    does, touching only the tensors that are not meta already (on the streamed path that is a layer's norms and
    router; ``to`` would walk every expert's Linear in every layer)."""
    for sub in module.modules():
        for name, param in sub._parameters.items():
            if param is not None and not param.is_meta:
                sub._parameters[name] = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        for name, buf in sub._buffers.items():
            if buf is not None and not buf.is_meta:
                sub._buffers[name] = buf.to("meta")
