"""A minimal GGUF (v2/v3) reader for the benchmark's real model: metadata, tensor index, and dequantization of the
types a small llama.cpp checkpoint uses (F32, F16, BF16, Q8_0, Q4_0, Q4_1). Pure numpy, no pickle, no llama.cpp.

Layouts follow ggml's definitions (ggml/src/ggml-common.h in ggml-org/llama.cpp, and gguf-py's
gguf/quants.py): a block of 32 values along a tensor's first GGUF dimension (the innermost, = a Linear's input dim):
- Q8_0: fp16 d, int8 qs[32]; x = d * q.
- Q4_0: fp16 d, uint8 qs[16]; q = nibble - 8 (low nibbles are values 0..15, high nibbles 16..31); x = d * q.
- Q4_1: fp16 d, fp16 m, uint8 qs[16]; q = nibble (same order); x = d * q + m.
GGUF lists dims innermost first, so a tensor of GGUF shape [ne0, ne1] is the row-major array [ne1, ne0].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"GGUF"
QK = 32  # values per quantized block
# ggml type id -> (name, bytes per block, values per block)
TYPES = {0: ("F32", 4, 1), 1: ("F16", 2, 1), 2: ("Q4_0", 18, QK), 3: ("Q4_1", 20, QK), 8: ("Q8_0", 34, QK),
         30: ("BF16", 2, 1)}
# gguf metadata value type id -> struct format (scalars); 8 = string, 9 = array
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (numpy) order: GGUF dims reversed
    type_id: int
    offset: int  # absolute, in the file


class GGUFFile:
    """Metadata (``fields``) and tensors (``tensors``, by name) of one GGUF file, memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._buf = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._pos = 0
        if bytes(self._buf[:4]) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file")
        self._pos = 4
        version = self._scalar(4)
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} of {path} not supported (2 or 3)")
        n_tensors, n_kv = self._scalar(10), self._scalar(10)
        self.fields: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = [self._scalar(10) for _ in range(self._scalar(4))]
            type_id, offset = self._scalar(4), self._scalar(10)
            infos.append((name, tuple(reversed(dims)), type_id, offset))
        align = int(self.fields.get("general.alignment", 32))
        data_start = (self._pos + align - 1) // align * align
        self.tensors = {n: TensorInfo(n, s, t, data_start + o) for n, s, t, o in infos}

    # ---- metadata parsing --------------------------------------------------------------------------------------
    def _scalar(self, type_id: int):
        fmt = _SCALARS[type_id]
        size = struct.calcsize(fmt)
        (v,) = struct.unpack(fmt, bytes(self._buf[self._pos:self._pos + size]))
        self._pos += size
        return v

    def _string(self) -> str:
        n = self._scalar(10)
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8")
        self._pos += n
        return s

    def _value(self, type_id: int):
        if type_id == 8:
            return self._string()
        if type_id == 9:
            item_type, n = self._scalar(4), self._scalar(10)
            if item_type in _SCALARS and item_type != 7:  # numeric arrays in one read
                dt = np.dtype(_SCALARS[item_type])
                arr = np.frombuffer(bytes(self._buf[self._pos:self._pos + n * dt.itemsize]), dtype=dt)
                self._pos += n * dt.itemsize
                return arr.tolist()
            return [self._value(item_type) for _ in range(n)]
        return self._scalar(type_id)

    # ---- tensors -----------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to float32, row-major shape (GGUF dims reversed)."""
        info = self.tensors[name]
        tname, block_bytes, per_block = TYPES[info.type_id]
        count = int(np.prod(info.shape))
        raw = self._buf[info.offset:info.offset + count // per_block * block_bytes]
        return dequantize(tname, np.asarray(raw), count).reshape(info.shape)

    def type_name(self, name: str) -> str:
        return TYPES[self.tensors[name].type_id][0]


def dequantize(type_name: str, raw: np.ndarray, count: int) -> np.ndarray:
    """``raw`` uint8 bytes of ``count`` values of ggml type ``type_name`` -> float32 [count]."""
    if type_name == "F32":
        return raw.view(np.float32).copy()
    if type_name == "F16":
        return raw.view(np.float16).astype(np.float32)
    if type_name == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    blocks = raw.reshape(count // QK, -1)  # [n_blocks, block_bytes]
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [n_blocks, 1]
    if type_name == "Q8_0":
        q = blocks[:, 2:].copy().view(np.int8).astype(np.float32)  # [n_blocks, 32]
        return (d * q).reshape(-1)
    if type_name in ("Q4_0", "Q4_1"):
        first = 2 if type_name == "Q4_0" else 4
        qs = blocks[:, first:]  # [n_blocks, 16]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)  # values 0..15 then 16..31
        if type_name == "Q4_0":
            return (d * (q - 8)).reshape(-1)
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        return (d * q + m).reshape(-1)
    raise ValueError(f"ggml type {type_name} not supported")
