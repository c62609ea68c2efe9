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
    """Collect tensors; flush a shard once ``max_shard_bytes`` is reached (at a caller-chosen boundary).

    ``tag`` keeps the shard names of concurrent writers (one per rank) apart until ``finalize_checkpoint``
    gives every shard its final ``model-XXXXX-of-XXXXX`` name.
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tag: str = ""):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.tag = tag
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: set[str] = set()
        self.shards: list[tuple[str, list[str], int]] = []  # (file name, tensor names, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(nbytes for _, _, nbytes in self.shards) + self._pending_bytes

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or name in self._written:
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
        fname = f"model-{self.tag}{len(self.shards) + 1:05d}.safetensors"
        tmp = self.out_dir / (fname + ".tmp")
        save_file(self._pending, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)  # safetensors creates files owner-only; checkpoints are shared artefacts
        os.replace(tmp, self.out_dir / fname)
        self.shards.append((fname, sorted(self._pending), self._pending_bytes))
        self._written.update(self._pending)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[tuple[str, list[str], int]]:
        """Flush what is pending; return this writer's shards."""
        self.flush()
        return list(self.shards)

    def finalize(self, config: dict, source_dir: str | Path) -> Path:
        """Single-writer shortcut for :func:`finalize_checkpoint`."""
        return finalize_checkpoint(self.out_dir, self.close(), config, source_dir)


def finalize_checkpoint(out_dir: str | Path, shards: list[tuple[str, list[str], int]], config: dict,
                        source_dir: str | Path) -> Path:
    """Name shards ``-of-N`` (in the given order), copy tokenizer files, then write the index and config last."""
    out_dir = Path(out_dir)
    n = len(shards)
    weight_map: dict[str, str] = {}
    for i, (fname, names, _) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(out_dir / fname, out_dir / final)
        weight_map.update({name: final for name in names})
    for pattern in COPY_PATTERNS:
        for src in Path(source_dir).glob(pattern):
            shutil.copy2(src, out_dir / src.name)
    total = sum(nbytes for _, _, nbytes in shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=2) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
