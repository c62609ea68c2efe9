"""Write a quantized checkpoint as layers finish: streamed safetensors shards, atomic files, index and config last.

Tensors are never buffered: each one goes straight into the open shard file (``*.safetensors.tmp``) behind a
reserved header region, and the JSON header is written into that region when the shard closes (padded with
spaces, which the safetensors format allows), then the file is renamed. A file with a final name is therefore
always whole, and memory stays one tensor, however large a shard is.

Shard data is written with ``O_DIRECT`` on local disk filesystems (``slim.directio``; ``export.direct_io``):
the page cache is skipped, since copying a write-once checkpoint into fresh cache pages only costs.

Every tensor's bytes are hashed as they are written (``slim.checksum``, ``export.checksum``: XXH3-128 by
default). With ``sha256`` a piece of 1 MiB or more is hashed on a helper thread while it is written (hashlib
and file writes release the GIL).

``slim_manifest.json`` (a digest of every tensor's bytes), ``model.safetensors.index.json`` and ``config.json``
are written at the very end, config last: a directory without ``config.json`` is an unfinished export, never a
checkpoint that looks complete. ``python -m slim.verify`` checks a checkpoint against its manifest.
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import os
import re
import shutil
import struct
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

import torch

from slim import checksum
from slim.errors import SlimError
from slim.directio import LOCAL_FILESYSTEMS, STAGE_BYTES, filesystem_type, open_direct, stage_bytes_for

log = logging.getLogger(__name__)
INDEX = "model.safetensors.index.json"
MANIFEST = "slim_manifest.json"
DEFAULT_MAX_SHARD_BYTES = 4 << 30
HEADER_RESERVE = 1 << 20  # most bytes reserved before a shard's data: room for ~7000 tensor entries
HASH_BESIDE_BYTES = 1 << 20  # sha256: pieces this large are hashed on a helper thread while they are written
MAX_QUEUED_BYTES = 16 << 20  # background writes: default bound on the bytes held by writes not yet started
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
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_METADATA = {"__metadata__": {"format": "pt"}}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian bytes, without a copy when it is already contiguous on the CPU. The view does
    not keep the tensor alive: hold the tensor while the view is used."""
    if tensor.is_cpu and tensor.is_contiguous():
        # straight from its address: a quantized Linear writes three small tensors, and detach, reshape, view
        # and numpy (a new object each) would be a large share of the shard writer's time per small tensor
        return memoryview((ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())).cast("B")
    t = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


_hasher: ThreadPoolExecutor | None = None


def _hash_beside(hasher: checksum.Hasher, buf: memoryview) -> Future:
    """``hasher.update(buf)`` on a helper thread while the caller writes ``buf`` (both release the GIL)."""
    global _hasher
    if _hasher is None:
        _hasher = ThreadPoolExecutor(1, thread_name_prefix="slim-hash")
    return _hasher.submit(hasher.update, buf)


def _entry_json(name: str, entry: dict) -> str:
    """``json.dumps(name) + ":" + json.dumps(entry, separators=(",", ":"))`` for a header entry (dtype, shape,
    data_offsets), built directly: it runs for every tensor written, and two ``json.dumps`` calls per entry
    would be a large share of the writer thread's time per small tensor."""
    shape = ",".join(map(str, entry["shape"]))
    start, end = entry["data_offsets"]
    return (f'{encode_basestring_ascii(name)}:{{"dtype":{encode_basestring_ascii(entry["dtype"])},'
            f'"shape":[{shape}],"data_offsets":[{start},{end}]}}')


class ShardFile:
    """One safetensors file written tensor by tensor; ``close()`` fills in the header and renames it."""

    def __init__(self, path: Path, entries: dict[str, dict] | None = None, data_bytes: int = 0,
                 reserve: int = HEADER_RESERVE, direct_io: bool = True, algorithm: str = checksum.DEFAULT,
                 stage_bytes: int = STAGE_BYTES):
        self.path, self.tmp, self.reserve = path, path.with_name(path.name + ".tmp"), reserve
        self.algorithm, self._beside = algorithm, checksum.hash_beside(algorithm)
        self.entries: dict[str, dict] = dict(entries or {})
        self.data_bytes = data_bytes
        self._header_len = len(json.dumps(_METADATA, separators=(",", ":"))) + sum(
            len(_entry_json(n, e)) + 1 for n, e in self.entries.items())
        if data_bytes:  # resume: the committed prefix of the file stays, whatever came after it goes
            if not self.tmp.exists() and self.path.exists():
                os.replace(self.path, self.tmp)
            self._f = open(self.tmp, "r+b")
            self._f.truncate(reserve + data_bytes)
            self._f.seek(reserve + data_bytes)
        else:
            self._f = open(self.tmp, "wb")
        # data goes around the page cache where the filesystem allows it (see slim.directio); the header
        # region is then a hole until close() writes the header into it
        self._direct = open_direct(self.tmp, reserve + data_bytes, stage_bytes) if direct_io else None
        if self._direct is None and not data_bytes:
            self._f.write(b"\0" * reserve)

    def fits(self, name: str, shape: tuple[int, ...]) -> bool:
        room = self.reserve - 8 - self._header_len - 1
        if 12 * len(name) + 21 * len(shape) + 96 <= room:  # a bound on the entry's length (\uXXXX pairs, 20-digit
            return True  # numbers): exact only near a full header, not for each of a layer's thousands of tensors
        entry = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [self.data_bytes, 1 << 62]}
        return len(_entry_json(name, entry)) <= room

    def add(self, name: str, tensor: torch.Tensor) -> str:
        """Append ``tensor``; returns the digest of its bytes."""
        return self.add_pieces(name, tensor.dtype, tuple(tensor.shape), (tensor,))

    def add_pieces(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: Iterable[torch.Tensor]) -> str:
        """Append a tensor given as consecutive pieces (each written and hashed before the next is asked for, so
        a producer may reuse one buffer); returns the digest of its bytes (``self.algorithm``)."""
        if dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {dtype} has no safetensors equivalent")
        hasher, nbytes = checksum.new(self.algorithm), 0
        for piece in pieces:
            buf = tensor_bytes(piece)
            beside = _hash_beside(hasher, buf) if self._beside and buf.nbytes >= HASH_BESIDE_BYTES else None
            (self._direct or self._f).write(buf)
            if beside is None:
                hasher.update(buf)
            else:
                beside.result()
            nbytes += buf.nbytes
        expected = math.prod(shape) * dtype.itemsize
        if nbytes != expected:
            raise ValueError(f"{name}: pieces hold {nbytes} bytes, {dtype} {list(shape)} needs {expected}")
        end = self.data_bytes + nbytes
        entry = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [self.data_bytes, end]}
        self.entries[name] = entry
        self._header_len += len(_entry_json(name, entry)) + 1
        self.data_bytes = end
        return hasher.hexdigest()

    def state(self) -> dict[str, Any]:
        if self._direct is not None:
            self._direct.sync()
        self._f.flush()
        return {"file": self.path.name, "entries": self.entries, "data_bytes": self.data_bytes, "reserve": self.reserve}

    def close(self) -> None:
        header = json.dumps({**_METADATA, **dict(sorted(self.entries.items()))}, separators=(",", ":")).encode()
        pad = self.reserve - 8 - len(header)
        if pad < 0:
            raise RuntimeError(f"{self.path.name}: header of {len(header)} bytes overflows its reserve")
        if self._direct is not None:
            direct, self._direct = self._direct, None
            direct.close()  # every data byte written and the file cut to its length before the header goes in
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self.reserve - 8) + header + b" " * pad)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.chmod(self.tmp, 0o644)
        os.replace(self.tmp, self.path)

    def abandon(self) -> None:
        if self._direct is not None:
            self._direct.abandon()
            self._direct = None
        self._f.close()


class CheckpointWriter:
    """Stream tensors into shards; a shard closes at a caller-chosen boundary once ``max_shard_bytes`` is reached.

    ``tag`` keeps the shard names of concurrent writers (one per rank) apart until ``finalize_checkpoint``
    gives every shard its final ``model-XXXXX-of-XXXXX`` name. ``state()``/``restore()`` let an interrupted
    export continue from a commit point and produce the same bytes as an uninterrupted one.

    ``background``: tensors are written (hashed, copied to disk) by one writer thread in the order they were
    added, while the caller quantizes the next ones; ``state()``, ``maybe_flush()``, ``flush()``, ``close()``
    and ``total_bytes`` wait for the queue first, so commit points describe what is on disk. An error of the
    writer thread is raised by the next of those calls (or the next ``add`` that has to wait).
    """

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, tag: str = "",
                 direct_io: bool | None = None, background: bool = False, algorithm: str = checksum.DEFAULT,
                 max_queued_bytes: int | None = None):
        self.out_dir = Path(out_dir)
        self.max_queued_bytes = MAX_QUEUED_BYTES if max_queued_bytes is None else max_queued_bytes
        self.stage_bytes = stage_bytes_for(self.max_queued_bytes)  # direct writes: a deeper queue, bigger writes
        checksum.new(algorithm)  # an unknown algorithm fails here, not on the writer thread
        self.algorithm = algorithm
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if direct_io is None:  # default: around the page cache on local disk filesystems only (slim.directio)
            fstype = filesystem_type(self.out_dir)
            direct_io = fstype in LOCAL_FILESYSTEMS
            log.info("shards in %s (%s): %s writes (export.direct_io=%s forces the other)", self.out_dir,
                     fstype or "filesystem unknown", "direct" if direct_io else "buffered",
                     str(not direct_io).lower())
        self.direct_io = direct_io
        self.max_shard_bytes = max_shard_bytes
        # 1/4096 of a shard (1 MiB for 4 GiB shards), at least 64 KiB; a full header closes the shard early
        self.header_reserve = min(HEADER_RESERVE, max(64 << 10, max_shard_bytes >> 12))
        self.tag = tag
        self._current: ShardFile | None = None
        self.checksums: dict[str, str] = {}
        self.shards: list[tuple[str, list[str], int]] = []  # closed: (file name, tensor names, bytes)
        # background writes: one thread, so tensors land in the order they were added
        self.background = background  # False: add() has written the tensor's bytes when it returns
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="slim-writer") if background else None
        self._jobs: deque[tuple[Future, int]] = deque()
        self._queued: set[str] = set()
        self._queued_bytes = 0
        self._failed = False

    def _shard_name(self, i: int) -> str:
        return f"model-{self.tag}{i:05d}.safetensors"

    @property
    def total_bytes(self) -> int:
        self.wait()
        return sum(nbytes for _, _, nbytes in self.shards) + (self._current.data_bytes if self._current else 0)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_pieces(name, tensor.dtype, tuple(tensor.shape), (tensor,))

    def add_pieces(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: Iterable[torch.Tensor],
                   held_bytes: int | None = None) -> None:
        """Write a tensor given as consecutive pieces of its bytes (see :meth:`ShardFile.add_pieces`). With
        ``background``, the write is queued for the writer thread and this returns at once: the tensor (or the
        piece iterator, which then runs on that thread) is kept until written, and the caller waits while more
        than ``max_queued_bytes`` (default ``MAX_QUEUED_BYTES``) are held by writes queued behind the one in
        progress. ``held_bytes``: what the queued write holds in memory (default the tensor's size; a piece
        iterator's buffer is less)."""
        nbytes = math.prod(shape) * dtype.itemsize if held_bytes is None else held_bytes
        self._enqueue([name], nbytes, self._write, name, dtype, shape, pieces)

    def add_all(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """:meth:`add` each of ``tensors`` in order, handed to the writer thread as one job: a quantized Linear's
        weight, scales and shape cost one hand-over between the threads instead of three."""
        items = list(tensors.items())
        held = 0 if self._thread is None else sum(t.numel() * t.element_size() for _, t in items)  # queued only
        self._enqueue([name for name, _ in items], held, self._write_all, items)

    def _enqueue(self, names: list[str], nbytes: int, write: Callable, *args) -> None:
        """Run ``write(*args)`` (which writes ``names``, holding ``nbytes`` until then) now, or queue it for the
        writer thread and wait while more than ``max_queued_bytes`` are queued behind the write in progress."""
        for name in names:
            if name in self.checksums or name in self._queued:
                raise ValueError(f"tensor {name} written twice")
        if self._thread is None:
            write(*args)
            return
        self._queued.update(names)
        self._jobs.append((self._thread.submit(write, *args), nbytes))
        self._queued_bytes += nbytes
        while len(self._jobs) > 1 and self._queued_bytes > self.max_queued_bytes:
            self._finish_oldest()

    def _write_all(self, items: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in items:  # after a failure _write skips the rest, as it skips later jobs
            self._write(name, tensor.dtype, tuple(tensor.shape), (tensor,))

    def _write(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], pieces: Iterable[torch.Tensor]) -> None:
        if self._failed:
            return  # an earlier write failed: nothing may land after it (the caller raises its error)
        try:
            if self._current is not None and self._current.entries and not self._current.fits(name, shape):
                self._close_current()  # header region full: close this shard early
            if self._current is None:
                self._current = ShardFile(self.out_dir / self._shard_name(len(self.shards) + 1),
                                          reserve=self.header_reserve, direct_io=self.direct_io,
                                          algorithm=self.algorithm, stage_bytes=self.stage_bytes)
            self.checksums[name] = self._current.add_pieces(name, dtype, shape, pieces)
        except BaseException:
            self._failed = True
            raise

    def _finish_oldest(self) -> None:
        future, nbytes = self._jobs.popleft()
        self._queued_bytes -= nbytes
        future.result()  # the writer thread's error, raised here

    def wait(self) -> None:
        """Return once every queued write is done; raises the first error of the writer thread."""
        try:
            while self._jobs:
                self._finish_oldest()
        finally:
            self._jobs.clear()
            self._queued_bytes = 0
            self._queued.clear()

    def maybe_flush(self) -> None:
        """Call at layer boundaries: closes the open shard once it holds ``max_shard_bytes``."""
        self.wait()
        if self._current is not None and self._current.data_bytes >= self.max_shard_bytes:
            self._close_current()

    def flush(self) -> None:
        self.wait()
        self._close_current()

    def _close_current(self) -> None:
        if self._current is None:
            return
        cur, self._current = self._current, None
        cur.close()
        self.shards.append((cur.path.name, sorted(cur.entries), cur.data_bytes))

    def close(self) -> list[tuple[str, list[str], int]]:
        """Close the open shard; return this writer's shards."""
        self.flush()
        return list(self.shards)

    def state(self) -> dict[str, Any]:
        self.wait()
        return {"shards": [list(s) for s in self.shards], "checksums": dict(self.checksums),
                "current": None if self._current is None else self._current.state()}

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (taken by ``state()``); drops this writer's files written after it."""
        self.shards = [(f, list(names), n) for f, names, n in state["shards"]]
        self.checksums = dict(state["checksums"])
        cur = state["current"]
        keep = {f for f, _, _ in self.shards} | ({cur["file"]} if cur else set())
        pattern = re.compile(re.escape(f"model-{self.tag}") + r"\d{5}\.safetensors(\.tmp)?$")
        for path in self.out_dir.iterdir():
            if pattern.fullmatch(path.name) and path.name.removesuffix(".tmp") not in keep:
                path.unlink()
        if cur:
            self._current = ShardFile(self.out_dir / cur["file"], cur["entries"], cur["data_bytes"], cur["reserve"],
                                      self.direct_io, self.algorithm, self.stage_bytes)

    def abandon(self) -> None:
        """After a failure: let a write in progress end (its error, or any other, is dropped: the caller is
        already handling one), then close the open shard file as it is."""
        self._failed = True  # queued writes are skipped
        try:
            self.wait()
        except Exception:
            pass
        if self._current is not None:
            self._current.abandon()
            self._current = None

    def finalize(self, config: dict, source_dir: str | Path) -> Path:
        """Single-writer shortcut for :func:`finalize_checkpoint`."""
        return finalize_checkpoint(self.out_dir, self.close(), config, source_dir, self.checksums, self.algorithm)


def copied_files(source_dir: str | Path) -> list[Path]:
    """The source files a checkpoint carries over (``COPY_PATTERNS``): each must be a regular file in the model
    directory itself. A symbolic link is refused, since it could carry any file the user can read (a private key
    named tokenizer.json) into a checkpoint that is then shared."""
    out = []
    for pattern in COPY_PATTERNS:
        for src in sorted(Path(source_dir).glob(pattern)):
            if src.is_symlink() or not src.is_file():
                raise SlimError(f"{src} is {'a symbolic link' if src.is_symlink() else 'not a regular file'}; slim "
                                "copies only regular files from the model directory into a checkpoint: replace it "
                                f"with the file itself (cp --remove-destination \"$(readlink -f {src})\" {src})")
            out.append(src)
    return out


def final_shard_names(shards: list[tuple[str, list[str], int]]) -> list[str]:
    return [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]


def finalize_checkpoint(out_dir: str | Path, shards: list[tuple[str, list[str], int]], config: dict,
                        source_dir: str | Path, checksums: dict[str, str], algorithm: str = checksum.DEFAULT) -> Path:
    """Name shards ``-of-N`` (in the given order), copy tokenizer files, then write manifest, index and config.
    ``checksums``: each tensor's digest by ``algorithm`` (what the writers used).

    Idempotent: an interrupted finalize run again with the same arguments completes the same checkpoint.
    """
    out_dir = Path(out_dir)
    weight_map: dict[str, str] = {}
    for (fname, names, _), final in zip(shards, final_shard_names(shards)):
        if (out_dir / fname).exists():
            os.replace(out_dir / fname, out_dir / final)
        elif not (out_dir / final).exists():
            raise FileNotFoundError(f"shard {fname} of this export is missing from {out_dir}")
        weight_map.update({name: final for name in names})
    for src in copied_files(source_dir):
        shutil.copyfile(src, out_dir / src.name, follow_symlinks=False)
    total = sum(nbytes for _, _, nbytes in shards)
    manifest = {"format": "slim-manifest-1", "algorithm": algorithm,
                "files": {final: {"bytes": (out_dir / final).stat().st_size} for final in final_shard_names(shards)},
                "tensors": {name: {"file": weight_map[name], algorithm: checksums[name]}
                            for name in sorted(weight_map)}}
    atomic_write_text(out_dir / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_text(out_dir / INDEX, json.dumps(index, indent=2) + "\n")
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
