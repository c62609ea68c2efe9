"""A checkpoint read one part at a time: the embedding, each decoder layer, the final norm and head.

The model is a meta skeleton (no memory); ``part(module, prefix)`` fills one part from the checkpoint for the
duration of a ``with`` block and empties it after, so only that part's weights are ever resident. Any checkpoint
slim reads works: the block-FP8 or bf16 source, and every layout of ``slim.formats`` (found by
``detect_format`` from config.json, read by ``fmt.read`` into SimQuantLinear modules that compute with the serving
engine's scales, ``numerics``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from slim.errors import SlimError
from slim.models.adapters import build_skeleton, load_config
from slim.models.checkpoint import CheckpointReader
from slim.models.loading import materialize_rest, read_quantized, torch_dtype
from slim.models.materialize import release
from slim.models.simulated import swap_in

log = logging.getLogger(__name__)


class CheckpointParts:
    """The skeleton of the checkpoint at ``path`` and its parts, filled on demand (see module docstring)."""

    def __init__(self, path: str | Path, *, load_type: str = "bf16", dtype: str = "bfloat16",
                 trust_remote_code: bool = False, numerics: str = "checkpoint", device: str | torch.device = "cpu"):
        from slim.formats import detect_format, quantized_modules

        self.path, self.numerics, self.device = Path(path), numerics, torch.device(device)
        self.dtype = torch_dtype(dtype, self.device.type)
        config = load_config(str(path), trust_remote_code)
        self.model, self.adapter = build_skeleton(config, self.dtype)
        qcfg = getattr(config, "quantization_config", None)
        try:
            self.fmt = detect_format(qcfg if isinstance(qcfg, dict) else None)
        except ValueError as exc:
            raise SlimError(f"{path}: {exc}") from None
        self.reader = CheckpointReader(path, load_type="fp8" if self.fmt is None and load_type == "fp8" else "bf16")
        self.adapter.open_reader(self.reader, config)
        if self.fmt is None:
            self.reader.check_load_type()
        self.quantized = quantized_modules(self.reader.names(), self.fmt) if self.fmt is not None else {}

    @property
    def config(self):
        return self.model.config

    def layers(self) -> nn.ModuleList:
        return self.adapter.layers(self.model)

    def layer_prefix(self, index: int) -> str:
        return self.adapter.layer_prefix(index)

    @contextlib.contextmanager
    def part(self, module: nn.Module, prefix: str) -> Iterator[nn.Module]:
        """``module`` (named ``prefix`` in the checkpoint, e.g. ``model.layers.3.``) with its weights on the
        device while the block runs; back on the meta device after it."""
        root = self.model
        names = {n: t for n, t in self.quantized.items() if n.startswith(prefix) or n + "." == prefix}
        replaced = read_quantized(root, self.reader, self.fmt, names, self.numerics, self.dtype, self.device) \
            if names else {}
        try:
            current = root.get_submodule(prefix.rstrip(".")) if prefix.rstrip(".") else root
            materialize_rest(current, self.reader, self.device, prefix=prefix)
            yield current
        finally:
            for name, old in replaced.items():
                swap_in(root, name, old)
            release(root.get_submodule(prefix.rstrip(".")))
            self.reader.close()  # unmap the shards read for this part: RSS must not grow with depth

    def head_parts(self) -> dict[str, nn.Module]:
        return self.adapter.head_modules(self.model)

    def tail_parts(self) -> dict[str, nn.Module]:
        return self.adapter.tail_modules(self.model)

    def rotary_to(self, device: torch.device) -> None:
        self.model.model.rotary_emb.to(device)
