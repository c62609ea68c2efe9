"""Commit points of an export, so a killed or crashed run continues where it stopped.

After a decoder layer (every ``export.commit_every`` layers) each rank saves, in ``<checkpoint>/.slim_resume/``: its
writer's state (closed shards, the open shard's committed length and header entries, tensor checksums), its
per-module reports, and its slice of the calibration hidden states. The first three go into the rank's journal
(``rankNNN-journal.jsonl``), one line per commit point holding only what is new since the line before (the open
shard's header entries too, while it is the same file), so a commit costs the same at layer 60 as at layer 1 (with
the open shard whole in every line, the JSON to encode would grow with every layer of the shard). Once every rank has
saved, rank 0 writes ``commit.json``; a rerun of the same command reads it, folds the journal up to that layer (and
cuts off any line after it), truncates the open shard back to the committed length and continues with the next
layer. Everything is deterministic, so the finished checkpoint is byte-identical to that of an uninterrupted run. A
commit belongs to one configuration (its fingerprint); a run with another configuration refuses to touch it unless
``overwrite=true``.

The pipeline keeps one journal per writer *slot* (the world size that started the export) and the hidden states per
rank through :class:`slim.layout.ResumeSet`, so a rerun may use another number of ranks; ``commit.json`` then also
names the slots and the world that saved it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from itertools import islice
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
        self.journal = self.dir / f"rank{rank:03d}-journal.jsonl"
        self._saved: tuple[int, int, int] | None = None  # shards, checksums, modules in the journal; None: none yet
        self._saved_current: tuple[str, int] | None = None  # the open shard in the journal: file, header entries

    def _hidden_file(self, layer: int) -> Path:
        return self.dir / f"rank{self.rank:03d}-layer{layer:05d}.safetensors"

    def commit_record(self) -> dict[str, Any] | None:
        path = self.dir / "commit.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def save_layer(self, layer: int, writer_state: dict, modules: list[dict],
                   hidden: list[torch.Tensor] | None) -> None:
        """This rank's part of the commit after ``layer`` (call ``commit`` on rank 0 once every rank has saved).

        ``writer_state`` and ``modules`` are the whole state; the journal gets what the previous save of this store
        did not have (shards, checksums and modules only ever grow, in order). ``hidden=None``: the caller keeps
        the hidden states itself (``slim.layout.ResumeSet``, one journal per writer slot)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if hidden is not None:
            tensors = self._hidden_file(layer)
            tmp = tensors.with_name(tensors.name + ".tmp")
            save_file({f"hidden.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}, str(tmp))
            tmp.replace(tensors)
        n_shards, n_sums, n_modules = self._saved or (0, 0, 0)
        checksums, current = writer_state["checksums"], writer_state["current"]
        if current is not None:  # the open shard's entries only grow (in order) until it closes
            entries = current["entries"]
            done = self._saved_current[1] if self._saved_current and self._saved_current[0] == current["file"] else 0
            current = {**current, "entries": dict(islice(entries.items(), done, None)), "entries_before": done}
        line = {"fingerprint": self.fingerprint, "layer": layer, "num_hidden": len(hidden or ()),
                "current": current, "shards": writer_state["shards"][n_shards:],
                "checksums": dict(islice(checksums.items(), n_sums, None)), "modules": modules[n_modules:]}
        with open(self.journal, "a" if self._saved else "w") as f:  # a new store starts a new journal
            f.write(json.dumps(line) + "\n")
            f.flush()
        self._saved = (len(writer_state["shards"]), len(checksums), len(modules))
        self._saved_current = None if current is None else (current["file"], done + len(current["entries"]))
        if hidden is None:
            return
        for old in self.dir.glob(f"rank{self.rank:03d}-layer*"):  # the commit may still be the previous layer
            if int(old.name.split("layer")[1][:5]) < layer - 1:
                old.unlink()

    def commit(self, layer: int, **fields: Any) -> None:
        """Name ``layer`` as the last committed one (``fields``: more for the record, see slim.layout)."""
        atomic_write_text(self.dir / "commit.json", json.dumps(
            {"fingerprint": self.fingerprint, "stage": "layer", "layer": layer, **fields}) + "\n")

    def load_layer(self, layer: int, device: torch.device, hidden: bool = True) -> LayerCommit:
        """The commit after ``layer``: the journal folded up to it; lines after it (a commit point saved but not
        committed, or a line cut short by a crash) are removed, so later saves continue the journal.
        ``hidden=False``: the journal only (the caller reads the hidden states, see ``save_layer``)."""
        shards, checksums, modules, last, end, entries = [], {}, [], None, 0, {}
        with open(self.journal, "rb") as f:
            for raw in f:
                if not raw.endswith(b"\n"):
                    break  # cut short by a crash
                line = json.loads(raw)
                if line["layer"] > layer:
                    break
                shards += line["shards"]
                checksums.update(line["checksums"])
                modules += line["modules"]
                if line["current"] is not None:  # the open shard's entries: new ones after those of the line before
                    before = line["current"].get("entries_before", 0)
                    if not before:
                        entries = {}  # a new shard file
                    elif before != len(entries):
                        raise ValueError(f"{self.journal}: layer {line['layer']} continues an open shard of "
                                         f"{before} entries, the lines before hold {len(entries)}; rerun with "
                                         "overwrite=true to start over")
                    entries.update(line["current"]["entries"])
                last, end = line, end + len(raw)
        if last is None or last["layer"] != layer:
            raise FileNotFoundError(f"{self.journal} has no commit point for layer {layer}; "
                                    "rerun with overwrite=true to start over")
        os.truncate(self.journal, end)
        self._saved = (len(shards), len(checksums), len(modules))
        current = last["current"]
        if current is not None:
            current = {k: v for k, v in current.items() if k != "entries_before"} | {"entries": entries}
            self._saved_current = (current["file"], len(entries))
        flat = load_file(str(self._hidden_file(layer)), device=str(device)) if hidden else {}
        saved_hidden = [flat[f"hidden.{i}"] for i in range(last["num_hidden"])] if hidden else []
        writer = {"shards": shards, "checksums": checksums, "current": current}
        return LayerCommit(layer=layer, writer=writer, modules=modules, hidden=saved_hidden)

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
