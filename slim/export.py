"""Write a quantized checkpoint as layers finish: sharded safetensors, atomic files, index and config last.

Each shard is written to a temporary name and renamed when complete, so a file with a final name is
always whole. ``model.safetensors.index.json`` and ``config.json`` are written at the very end: a directory
without them is an unfinished export, never a checkpoint that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 4 << 30
# Files copied from the source checkpoint: tokenizer and generation settings (never code).
COPY_PATTERNS = (
    "tokenizer*.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "chat_template.jinja",
)


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class CheckpointWriter:
    """Collect tensors; flush a shard once ``max_shard_bytes`` is reached (at a caller-chosen boundary)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self.shards: list[tuple[str, list[str]]] = []  # (file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self.shards):
            raise ValueError(f"tensor {name} written twice")
        t = tensor.detach().to("cpu").contiguous()
        self._pending[name] = t
        self._pending_bytes += t.numel() * t.element_size()

    def maybe_flush(self) -> None:
        """Call at layer boundaries: writes a shard if enough is pending."""
        if self._pending_bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        tmp = self.out_dir / (fname + ".tmp")
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; checkpoints are shared artefacts
        os.replace(tmp, self.out_dir / fname)
        self.shards.append((fname, sorted(self._pending)))
        self.total_bytes += self._pending_bytes
        self._pending, self._pending_bytes = {}, 0

    def finalize(self, config: dict, source_dir: str | Path) -> Path:
        """Flush, name shards ``-of-N``, copy tokenizer files, then write the index and config.json last."""
        self.flush()
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, (fname, names) in enumerate(self.shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / fname, self.out_dir / final)
            weight_map.update({name: final for name in names})
        for pattern in COPY_PATTERNS:
            for src in Path(source_dir).glob(pattern):
                shutil.copy2(src, self.out_dir / src.name)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_text(self.out_dir / INDEX, json.dumps(index, indent=2) + "\n")
        atomic_write_text(self.out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        return self.out_dir
