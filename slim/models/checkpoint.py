"""Read a safetensors checkpoint tensor by tensor, memory-mapped, shard by shard.

Nothing here builds a model or loads a whole state dict: callers ask for the tensors of one module at a
time. DeepSeek's FP8 release stores a Linear weight as float8_e4m3fn plus ``<name>_scale_inv`` with one fp32
scale per 128x128 block; ``load_type="fp8"`` dequantizes those on the fly, ``load_type="bf16"`` refuses them.
"""

from __future__ import annotations

import json
import mmap
import struct
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from slim import kernels
from slim.errors import SlimError
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8_block
from slim.quant.stats import all_finite

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
BLOCK_SCALE_SUFFIX = "_scale_inv"  # weight -> weight_scale_inv
DECODE_CHUNK_BYTES = 4 << 20  # decoded_chunks: about this many bytes per piece (whole 128-row blocks)


# safetensors dtype names -> torch; a tensor of another dtype is read through safetensors itself
SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "BF16": torch.bfloat16, "F16": torch.float16,
    "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8,
    "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
}


class Shard:
    """One safetensors shard: its header, parsed once per run after ``safe_open`` has accepted the file, and a
    private memory map while it is open. A tensor is a view of the map (``torch.frombuffer``): no copy, and far
    less per-tensor overhead than ``safe_open(...).get_tensor`` (a quantized DeepSeek Linear reads two tensors,
    and R1 has tens of thousands). The map lives as long as the views of it do."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with safe_open(path, framework="pt"):  # safetensors' own checks of header and offsets
                pass
            with open(path, "rb") as f:
                (size,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(size))
                file_size = f.seek(0, 2)
        except Exception as exc:  # safetensors raises its own error types for truncated headers
            raise SlimError(f"cannot read {path}: {exc}; the file is truncated or corrupt") from exc
        header.pop("__metadata__", None)
        self.base, self.entries = 8 + size, {}
        for name, e in header.items():
            start, end = e["data_offsets"]
            dtype, shape = SAFETENSORS_DTYPES.get(e["dtype"]), tuple(e["shape"])
            numel = 1
            for d in shape:
                numel *= d
            if dtype is None or sys.byteorder != "little" or numel == 0:
                continue  # through safetensors (get)
            if not (0 <= start <= end <= file_size - self.base and end - start == numel * dtype.itemsize):
                raise SlimError(f"cannot read {path}: {name}'s offsets do not fit the file; it is corrupt")
            self.entries[name] = (dtype, shape, numel, self.base + start)
        self._map: mmap.mmap | None = None

    def open(self) -> None:
        if self._map is None:
            with open(self.path, "rb") as f:  # copy-on-write: writable views for torch, the file never written
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

    def close(self) -> None:
        """Drop this reader's map (unmapped once no tensor views it)."""
        self._map = None

    def get(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            with safe_open(self.path, framework="pt") as f:
                return f.get_tensor(name)
        self.open()
        dtype, shape, numel, offset = entry
        return torch.frombuffer(self._map, dtype=dtype, count=numel, offset=offset).view(shape)


def nonfinite_error(name: str, count: int, reader: CheckpointReader) -> SlimError:
    stored = reader.weight_map.get(name, "?")
    return SlimError(f"{name} (in {stored}) has {count} NaN/Inf value(s); the checkpoint is corrupt: re-download "
                     "or re-convert it")


class CheckpointReader:
    """Tensors of a safetensors checkpoint directory, by name.

    At most ``MAX_OPEN`` shards are open (memory-mapped) at a time, least recently used closed first, and
    ``close()`` drops them all: every page read through an open map counts in the process's RSS, so keeping
    every shard of a 600 GB checkpoint open would make memory grow with depth.
    """

    MAX_OPEN = 4

    def __init__(self, path: str | Path, load_type: str = "bf16", block: tuple[int, int] = (128, 128)):
        self.path = Path(path)
        self.load_type = load_type
        self.block = block
        if not (self.path / "config.json").is_file():
            raise SlimError(f"model path {self.path} has no config.json; point model.path at a checkpoint directory")
        self.weight_map = self._weight_map()
        self._shards: dict[str, Shard] = {}  # every shard read so far (headers only)
        self._open: OrderedDict[str, Shard] = OrderedDict()  # those with a map, least recently used first
        self.aliases: dict[str, str] = {}  # name -> stored name (tied weights saved once)
        # decoded_chunks' buffer, kept from tensor to tensor and layer to layer: one allocated per tensor came
        # back as fresh pages after every layer's malloc_trim, and the decode faulted them in (most of its time)
        self._decode_buf: torch.Tensor | None = None
        self._decode_busy = threading.Lock()  # held while a generator uses it; another one meanwhile has its own

    def _weight_map(self) -> dict[str, str]:
        if (self.path / INDEX).is_file():
            weight_map = json.loads((self.path / INDEX).read_text())["weight_map"]
            for shard in sorted(set(weight_map.values())):
                if Path(shard).name != shard or shard in (".", ".."):  # absolute, ../ or nested: outside this dir
                    raise SlimError(f"{self.path / INDEX} names shard {shard!r}, which is not a file name in "
                                    f"{self.path}; slim reads shards from the checkpoint directory only: fix the index")
                if not (self.path / shard).is_file():
                    raise SlimError(f"{self.path / INDEX} names shard {shard}, which is missing; re-download it")
            return weight_map
        shards = sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.glob("*.bin")) + sorted(p.name for p in self.path.glob("*.pt"))
            hint = f" (found {', '.join(pickles)}: pickle files are never loaded; convert them to safetensors)" if pickles else ""
            raise SlimError(f"no safetensors weights in {self.path}{hint}")
        weight_map, broken = {}, []
        for shard in shards:
            try:
                with safe_open(shard, framework="pt") as f:
                    weight_map.update({name: shard.name for name in f.keys()})
            except Exception as exc:  # safetensors raises its own error types for truncated headers
                broken.append(f"{shard}: {exc}")
        if broken:
            raise SlimError(f"{len(broken)} source shard(s) cannot be read: " + "; ".join(broken)
                            + " (the files are truncated or corrupt: re-download or repair them)")
        return weight_map

    def check_shards(self) -> None:
        """Read every shard's header and check each file against it (offsets within the file, sizes that match),
        headers only; one error names every broken file. Run before any heavy work, so that a truncated late
        shard is found before the first layer is quantized."""
        broken = []
        for name in sorted(set(self.weight_map.values())):
            if name in self._shards:
                continue
            try:
                self._shards[name] = Shard(self.path / name)
            except SlimError as exc:
                broken.append(str(exc).removeprefix("cannot read "))
        if broken:
            raise SlimError(f"{len(broken)} source shard(s) cannot be read: " + "; ".join(broken)
                            + " (re-download or repair them, then rerun the same command)")

    def _shard(self, name: str) -> Shard:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        shard = self._shards.get(name)
        if shard is None:
            shard = self._shards[name] = Shard(self.path / name)
        shard.open()
        self._open[name] = shard
        while len(self._open) > self.MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return shard

    def close(self) -> None:
        """Unmap every open shard (call between layers)."""
        for shard in self._open.values():
            shard.close()
        self._open.clear()

    def tie(self, name: str, stored: str) -> None:
        """Serve ``name`` from ``stored`` when the checkpoint saved tied weights once (tie_word_embeddings)."""
        if name not in self.weight_map and stored in self.weight_map:
            self.aliases[name] = stored

    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map or name in self.aliases

    def raw(self, name: str) -> torch.Tensor:
        """The tensor exactly as stored."""
        if name in self.aliases:  # a copy: the stored tensor may be written under its own name too
            return self.raw(self.aliases[name]).clone()
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise SlimError(f"tensor {name} is not in the checkpoint at {self.path}") from None
        return self._shard(shard).get(name)

    @cached_property
    def is_block_fp8(self) -> bool:
        return any(n.endswith("weight" + BLOCK_SCALE_SUFFIX) for n in self.weight_map)

    def check_load_type(self) -> None:
        if self.load_type == "bf16" and self.is_block_fp8:
            raise SlimError(
                f"{self.path} holds FP8 block-quantized weights (weight_scale_inv); set model.load_type=fp8, "
                f"or convert it first: python -m slim.models.convert {self.path} <bf16 dir>"
            )
        if self.load_type == "fp8" and not self.is_block_fp8:
            raise SlimError(f"{self.path} has no FP8 block scales (weight_scale_inv); set model.load_type=bf16")

    def get(self, name: str, dtype: torch.dtype, device: str | torch.device = "cpu") -> torch.Tensor:
        """A tensor as the model uses it, on ``device``: FP8 block weights dequantized (there: the 1-byte codes
        travel, not the decoded values), floats cast to ``dtype``."""
        t = self.raw(name)
        if t.dtype == FP8_DTYPE:
            scale_name = name + BLOCK_SCALE_SUFFIX
            if scale_name not in self.weight_map:
                raise SlimError(f"FP8 tensor {name} has no {scale_name}; the checkpoint is incomplete")
            return dequantize_fp8_block(t.to(device), self.raw(scale_name).to(device), self.block, dtype)
        return (t.to(dtype) if t.is_floating_point() else t).to(device)

    def is_block_fp8_tensor(self, name: str) -> bool:
        """True when ``name`` is stored as block FP8 (it has a ``_scale_inv``)."""
        return name + BLOCK_SCALE_SUFFIX in self.weight_map

    def decoded_chunks(self, name: str, dtype: torch.dtype, max_bytes: int = DECODE_CHUNK_BYTES
                       ) -> Iterator[torch.Tensor]:
        """A block-FP8 tensor decoded to ``dtype`` as consecutive blocks of rows (whole 128-row scale blocks, about
        ``max_bytes`` each), all in one reused buffer: each block must be consumed before the next is asked for.
        The buffer is the reader's, kept for the next tensor (a generator started while another one holds it gets
        a buffer of its own).
        The bytes of ``get(name, dtype)`` without ever holding the whole tensor; NaN/Inf values fail (after the
        last block, counting them all) as they fail materialize."""
        q, scale = self.raw(name), self.raw(name + BLOCK_SCALE_SUFFIX)  # here, in the caller's thread: the
        # reader's open-shard cache is not thread-safe, and the generator may run on the writer thread
        if q.dim() != 2 or q.dtype != FP8_DTYPE:
            raise SlimError(f"{name}: expected a 2-D float8_e4m3fn tensor beside {name + BLOCK_SCALE_SUFFIX}, "
                            f"found {q.dtype} {tuple(q.shape)}")
        return self._decode_rows(name, q, scale, dtype, max_bytes)

    def _decode_rows(self, name: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, max_bytes: int
                     ) -> Iterator[torch.Tensor]:
        """The generator behind :meth:`decoded_chunks` (which may run on another thread: it reads no shard)."""
        rows, cols = q.shape
        bm = self.block[0]
        step = max(1, max_bytes // max(1, cols * dtype.itemsize) // bm) * bm
        shape = (min(step, rows), cols)
        shared = self._decode_busy.acquire(blocking=False)
        try:
            if shared:
                nbytes = shape[0] * cols * dtype.itemsize
                if self._decode_buf is None or self._decode_buf.numel() < nbytes:
                    self._decode_buf = None  # the old one goes before the new one comes
                    self._decode_buf = torch.empty(nbytes, dtype=torch.uint8)
                buf = self._decode_buf[:nbytes].view(dtype).view(shape)
            else:
                buf = torch.empty(shape, dtype=dtype)
            bad = 0
            for r in range(0, rows, step):
                n = min(step, rows - r)
                q_rows, s_rows = q[r : r + n], scale[r // bm : -(-(r + n) // bm)]
                decoded = kernels.fp8_block_decode(q_rows, s_rows, self.block, dtype, out=buf[:n])
                if decoded is None:
                    piece = dequantize_fp8_block(q_rows, s_rows, self.block, dtype, out=buf[:n])
                    bad += 0 if all_finite(piece) else int((~torch.isfinite(piece)).sum())
                else:
                    piece, nonfinite = decoded
                    bad += nonfinite
                yield piece
            if bad:
                raise nonfinite_error(name, bad, self)
        finally:  # exhausted, failed or dropped midway (closed): the buffer is free for the next tensor
            if shared:
                self._decode_busy.release()

    def passthrough(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A tensor to copy into another checkpoint: as stored, or dequantized to ``dtype`` if block-FP8."""
        t = self.raw(name)
        if t.dtype != FP8_DTYPE:
            return t
        return dequantize_fp8_block(t, self.raw(name + BLOCK_SCALE_SUFFIX), self.block, dtype)

    def is_aux(self, name: str) -> bool:
        """True for tensors that are folded into another one on read (block scales)."""
        return name.endswith(BLOCK_SCALE_SUFFIX) and name[: -len(BLOCK_SCALE_SUFFIX)] in self.weight_map

    def config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())
