"""Who writes what, fixed by the world size that started an export; and resuming it on another world size.

Every rank of a data-parallel export writes the quantized modules it owns into its own shards (``model-rankNNN-``,
renamed ``-of-N`` in slot order by finalize), so a checkpoint's file layout depends on the number of writers. An
export keeps the number of writer **slots** it started with (``WriterLayout.slots``, recorded in every commit
point): a rerun on another world size hands slot ``v`` to rank ``v % world``. A rank then drives every slot it was
handed, each with its own :class:`~slim.export.CheckpointWriter`, its own :class:`~slim.quantize.LayerQuantizer`
(the modules of slot ``v``: the ``v``-th of every ``slots`` sorted targets; slot 0 also writes every unquantized
tensor) and its own resume journal. Each writer receives exactly the tensors, in exactly the order, that rank
``v`` of an uninterrupted run gives it, so the finished checkpoint is byte-identical to that run's; a rank
handed no slot (more ranks than slots) only calibrates its samples.

Calibration samples follow the world size of the moment: each rank saves its slice of the hidden states at a
commit point (``rank<r>-layer<L>.safetensors``: rows ``r, r+W, ...`` of the calibration set, in batches); a rerun
on ``W'`` ranks reads back rows ``r', r'+W', ...`` from those files and batches them as a fresh run on ``W'``
ranks would. Observers are merged with ``MAX``, so the scales do not depend on how the samples were split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slim.export import CheckpointWriter
from slim.resume import LayerCommit, ResumeStore

HIDDEN_FILE = re.compile(r"rank(\d{3})-layer(\d{5})\.safetensors$")


@dataclass(frozen=True)
class WriterLayout:
    """``slots`` writers (the world size that started the export), spread over the ``world`` ranks of now."""

    slots: int
    rank: int = 0
    world: int = 1

    def mine(self) -> list[int]:
        return [v for v in range(self.slots) if v % self.world == self.rank]

    def tag(self, slot: int) -> str:
        return f"rank{slot:03d}-" if self.slots > 1 else ""

    def slot_of(self, index: int) -> int:
        """The slot writing the ``index``-th of the sorted targets (round robin, as ``Dist.owns`` at ``slots``)."""
        return index % self.slots


class WriterGroup:
    """The writers of this rank's slots, with :class:`CheckpointWriter`'s interface where the pipeline and the
    layer loop use it; unquantized tensors (``add``/``add_pieces``) go to slot 0, which only rank 0 ever holds."""

    def __init__(self, layout: WriterLayout, make: Callable[[str], CheckpointWriter]):
        self.layout = layout
        self.writers = {v: make(layout.tag(v)) for v in layout.mine()}

    @property
    def algorithm(self) -> str:
        return next(iter(self.writers.values())).algorithm if self.writers else ""

    @property
    def background(self) -> bool:
        return any(w.background for w in self.writers.values())

    @property
    def checksums(self) -> dict[str, str]:
        return {k: v for w in self.writers.values() for k, v in w.checksums.items()}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.writers[0].add(name, tensor)

    def add_pieces(self, *args, **kwargs) -> None:
        self.writers[0].add_pieces(*args, **kwargs)

    def add_all(self, tensors) -> None:
        self.writers[0].add_all(tensors)

    def maybe_flush(self) -> None:
        for w in self.writers.values():
            w.maybe_flush()

    def state(self) -> dict[int, dict[str, Any]]:
        return {v: w.state() for v, w in self.writers.items()}

    def restore(self, states: dict[int, dict[str, Any]]) -> None:
        for v, w in self.writers.items():
            w.restore(states[v])

    def close(self) -> dict[int, list[tuple[str, list[str], int]]]:
        """Each slot's closed shards (gather them from every rank and order by slot: ``shards_in_slot_order``)."""
        return {v: w.close() for v, w in self.writers.items()}

    def abandon(self) -> None:
        for w in self.writers.values():
            w.abandon()


def shards_in_slot_order(parts: Iterable[dict[int, list]]) -> list:
    """Every rank's ``WriterGroup.close()`` -> one shard list in slot order (what finalize names ``-of-N``)."""
    merged = {v: shards for part in parts for v, shards in part.items()}
    return [shard for v in sorted(merged) for shard in merged[v]]


class QuantizerGroup:
    """One :class:`~slim.quantize.LayerQuantizer` per slot of this rank, driven like one. With ``everything``
    (``calibration.propagate=quantized``) the first quantizes every module for propagation (writing its own), the
    others only theirs."""

    def __init__(self, quantizers: list):
        self.quantizers = quantizers

    @property
    def moe_input_scale(self) -> str:
        return self.quantizers[0].moe_input_scale

    @moe_input_scale.setter
    def moe_input_scale(self, value: str) -> None:
        for q in self.quantizers:
            q.moe_input_scale = value

    def start(self, modules, everything: bool = False) -> None:
        for i, q in enumerate(self.quantizers):
            q.start(modules, everything and i == 0)

    @property
    def group_scale_dtype(self):
        return self.quantizers[0].group_scale_dtype

    @property
    def owned(self) -> set[str]:
        """The modules this rank writes, over all its slots."""
        return set().union(*(q.owned for q in self.quantizers))

    def write_rest(self, module, prefix: str, quantized: set[str], changed: set[str] = frozenset()) -> None:
        for q in self.quantizers:
            q.write_rest(module, prefix, quantized, changed)

    def quantize(self, modules, observers, static: bool, everything: bool = False, solved: dict | None = None) -> dict:
        out = {}
        for i, q in enumerate(self.quantizers):
            got = q.quantize(modules, observers, static, everything and i == 0, solved=solved)
            out = out or got
        return out


def layer_quantizer(writer, targets: Iterable[str], rank_owns: Callable[[int], bool], is_main: bool,
                    make: Callable[..., Any]):
    """The layer loop's quantizer: ``make(writer, owned, writes_rest)`` for a single writer (ownership by rank, as
    ever), or a :class:`QuantizerGroup` with one per slot of a :class:`WriterGroup` (ownership by slot)."""
    names = sorted(targets)
    if not isinstance(writer, WriterGroup):
        return make(writer, {n for i, n in enumerate(names) if rank_owns(i)}, is_main)
    layout = writer.layout
    if not writer.writers:  # more ranks than slots: this rank calibrates and writes nothing
        return make(None, set(), False)
    return QuantizerGroup([make(w, {n for i, n in enumerate(names) if layout.slot_of(i) == v}, v == 0)
                           for v, w in writer.writers.items()])


class ResumeSet:
    """This rank's part of a commit point under a :class:`WriterLayout`: one journal (:class:`ResumeStore`) per
    slot it holds, and its slice of the hidden states; ``ResumeStore``'s interface for the layer loop."""

    def __init__(self, out_dir: str | Path, layout: WriterLayout, fingerprint: str, targets: Iterable[str],
                 batch_size: int):
        self.layout, self.fingerprint, self.batch_size = layout, fingerprint, batch_size
        self.stores = {v: ResumeStore(out_dir, v, fingerprint) for v in layout.mine()}
        self.base = ResumeStore(out_dir, layout.rank, fingerprint)  # commit.json, written.json, clear
        self.dir = self.base.dir
        self.slot = {n: layout.slot_of(i) for i, n in enumerate(sorted(targets))}

    def commit_written(self, record: dict[str, Any]) -> None:
        self.base.commit_written(record)

    def clear(self) -> None:
        self.base.clear()

    def _hidden_file(self, rank: int, layer: int) -> Path:
        return self.dir / f"rank{rank:03d}-layer{layer:05d}.safetensors"

    def save_layer(self, layer: int, writer_state: dict[int, dict], modules: list[dict],
                   hidden: list[torch.Tensor]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self._hidden_file(self.layout.rank, layer)
        tmp = path.with_name(path.name + ".tmp")
        save_file({f"hidden.{i}": h.detach().to("cpu").contiguous() for i, h in enumerate(hidden)}, str(tmp))
        tmp.replace(path)
        for v, store in self.stores.items():
            store.save_layer(layer, writer_state[v], [m for m in modules if self.slot[m["name"]] == v], None)

    def commit(self, layer: int) -> None:
        """Rank 0, once every rank saved: the commit names the layer, the slots and the world that saved it; then
        hidden-state files of older layers go (of any rank: a rerun on fewer ranks leaves the old ranks' ones)."""
        self.base.commit(layer, slots=self.layout.slots, world=self.layout.world)
        for old in self.dir.iterdir():
            m = HIDDEN_FILE.match(old.name)
            if m and int(m.group(2)) < layer:
                old.unlink(missing_ok=True)

    def load_layer(self, commit: dict[str, Any], device: torch.device) -> LayerCommit:
        """The commit after ``commit['layer']``: this rank's slots' journals and its rows of the hidden states."""
        layer = commit["layer"]
        writer, modules = {}, []
        for v, store in self.stores.items():
            part = store.load_layer(layer, device, hidden=False)
            writer[v] = part.writer
            modules += part.modules
        hidden = resplit_hidden([self._hidden_file(r, layer) for r in range(commit.get("world", self.layout.slots))],
                                self.layout.rank, self.layout.world, self.batch_size, device)
        return LayerCommit(layer=layer, writer=writer, modules=modules, hidden=hidden)


def resplit_hidden(files: list[Path], rank: int, world: int, batch_size: int, device: torch.device
                   ) -> list[torch.Tensor]:
    """Rows ``rank, rank + world, ...`` of the calibration set from hidden states saved by ``len(files)`` ranks
    (file ``r`` holds rows ``r, r + len(files), ...`` in batches), in batches of ``batch_size``: the batches a
    fresh run on ``world`` ranks holds. Only this rank's rows are read."""
    saved = len(files)
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    batches = []  # per file: (key, rows) of each saved batch
    for f in handles:
        keys = sorted(f.keys(), key=lambda k: int(k.split(".")[1]))
        batches.append([(k, f.get_slice(k).get_shape()[0]) for k in keys])
    total = sum(rows for part in batches for _, rows in part)

    def row(g: int) -> torch.Tensor:  # global row g: file g % saved, its row g // saved
        pos, f = g // saved, g % saved
        for key, rows in batches[f]:
            if pos < rows:
                return handles[f].get_slice(key)[pos:pos + 1]
            pos -= rows
        raise IndexError(f"{files[f]} holds fewer rows than the calibration set needs (row {g} of {total})")

    mine = list(range(rank, total, world))
    out = []
    for start in range(0, len(mine), batch_size):
        out.append(torch.cat([row(g) for g in mine[start:start + batch_size]]).to(device))  # [b, T, H]
    return out
