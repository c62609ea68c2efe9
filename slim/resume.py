"""Commit points of an export, so a killed or crashed run continues where it stopped.

After a decoder layer (every ``export.commit_every`` layers) each rank saves, in ``<checkpoint>/.slim_resume/``:
its writer's state (closed shards, the open shard's committed length and header entries, tensor checksums),
its per-module reports, and its slice of the calibration hidden states. Once every rank has saved, rank 0
writes ``commit.json``; a rerun of the same command reads it, truncates the open shard back to the committed
length and continues with the next layer. Everything is deterministic, so the finished checkpoint is
byte-identical to that of an uninterrupted run. A commit belongs to one configuration (its fingerprint);
a run with another configuration refuses to touch it unless ``overwrite=true``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from slim.export import atomic_write_text

log = logging.getLogger(__name__)
RESUME_DIR = ".slim_resume"


@dataclass
class LayerCommit:
    layer: int  # last decoder layer whose tensors are all written
    writer: dict[str, Any]
    modules: list[dict[str, Any]]
    hidden: list[torch.Tensor]


class ResumeStore:
    def __init__(self, out_dir: str | Path, rank: int, fingerprint: str):
        self.dir = Path(out_dir) / RESUME_DIR
        self.rank, self.fingerprint = rank, fingerprint

    def _files(self, layer: int) -> tuple[Path, Path]:
        stem = f"rank{self.rank:03d}-layer{layer:05d}"
        return self.dir / f"{stem}.json", self.dir / f"{stem}.safetensors"

    def commit_record(self) -> dict[str, Any] | None:
        path = self.dir / "commit.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_layer(self, layer: int, writer_state: dict, modules: list[dict], hidden: list[torch.Tensor]) -> None:
        """This rank's part of the commit after ``layer`` (call ``commit`` on rank 0 once every rank has saved)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        meta, tensors = self._files(layer)
        tmp = tensors.with_name(tensors.name + ".tmp")
        save_file({f"hidden.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}, str(tmp))
        tmp.replace(tensors)
        atomic_write_text(meta, json.dumps({"fingerprint": self.fingerprint, "layer": layer, "writer": writer_state,
                                            "modules": modules, "num_hidden": len(hidden)}) + "\n")
        for old in self.dir.glob(f"rank{self.rank:03d}-layer*"):  # the commit may still be the previous layer
            if int(old.name.split("layer")[1][:5]) < layer - 1:
                old.unlink()

    def commit(self, layer: int) -> None:
        atomic_write_text(self.dir / "commit.json",
                          json.dumps({"fingerprint": self.fingerprint, "stage": "layer", "layer": layer}) + "\n")

    def load_layer(self, layer: int, device: torch.device) -> LayerCommit:
        meta_path, tensors = self._files(layer)
        meta = json.loads(meta_path.read_text())
        flat = load_file(str(tensors), device=str(device))
        hidden = [flat[f"hidden.{i}"] for i in range(meta["num_hidden"])]
        return LayerCommit(layer=layer, writer=meta["writer"], modules=meta["modules"], hidden=hidden)

    def commit_written(self, record: dict[str, Any]) -> None:
        """Every tensor is written: what finalize needs, so a rerun only finalizes."""
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.dir / "written.json", json.dumps(record) + "\n")
        atomic_write_text(self.dir / "commit.json",
                          json.dumps({"fingerprint": self.fingerprint, "stage": "written"}) + "\n")

    def load_written(self) -> dict[str, Any]:
        return json.loads((self.dir / "written.json").read_text())

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
