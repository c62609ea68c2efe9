"""Host allocator policy for the layer loop on a CPU (glibc only; elsewhere nothing changes).

glibc serves large allocations (128 KiB and up, by default) with pages of their own and returns them to the
kernel on free. The CPU weight path allocates and frees float32 temporaries of ~1 MB per row block of every
weight, so each one page-faults anew: on 3 DeepSeek-R1-shaped layers, 6.6 M page faults and 19.2 s in
``quantize_model`` without this policy, 0.6 M and 11.2 s with it. ``keep_temporaries_in_heap`` serves
allocations up to ``MMAP_THRESHOLD`` from the heap, which keeps up to ``TRIM_THRESHOLD`` free at its top for
the next block. Heap pages freed below live chunks are not returned by free(), so ``release_free_heap``
(glibc's ``malloc_trim``), called after each layer, hands them back: peak memory stays one layer at any depth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import math
import mmap
import os
import weakref
from collections.abc import Iterable

import numpy as np
import torch

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 64 << 20


@functools.cache
def _libc():
    """glibc with ``mallopt`` and ``malloc_trim``, or None (another libc, or ``SLIM_MALLOPT=0``); looked up once:
    ``find_library`` runs a subprocess."""
    if os.environ.get("SLIM_MALLOPT", "1") == "0":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_temporaries_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds (see module docstring); False where that is not glibc or
    ``SLIM_MALLOPT=0`` asks to leave the allocator alone."""
    libc = _libc()
    if libc is None:  # musl, macOS, Windows, or opted out
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("mallopt mmap threshold %d MiB, trim threshold %d MiB: %s", MMAP_THRESHOLD >> 20,
              TRIM_THRESHOLD >> 20, "set" if ok else "refused")
    return ok


def release_free_heap() -> None:
    """Return every free heap page to the kernel (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class LayerArena:
    """Host memory for one decoder layer's decoded weights, mapped once and reused by every later layer.

    On a CPU, fresh pages cost far more than the decode that fills them: on a 2-core VM, writing a decoded
    DeepSeek-R1 expert into new pages took 2.0 ns per weight, into pages used before 1.0 ns (huge pages did not
    help: the cost is the first touch, not the page count). Between ``begin(nbytes)`` and ``reset()``,
    :meth:`empty` carves tensors out of one anonymous mapping that stays mapped between layers, so the first
    layer touches the pages and the others reuse them. Peak memory is unchanged (the layer's weights were
    resident anyway); between layers the mapping holds one layer's weights.

    Nothing is ever overwritten while in use: ``reset`` checks, through weak references, that every tensor it
    handed out is gone; if one is still referenced, the mapping is left to it and the next layer maps a new one.
    Outside ``begin``/``reset``, and past the reserved size, :meth:`empty` is plain ``torch.empty``.
    """

    ALIGN = 64  # bytes; a cache line, and enough for every dtype

    def __init__(self) -> None:
        self._base: np.ndarray | None = None  # uint8 view of the mapping
        self._used = 0
        self._active = False
        self._handed: list[weakref.ref] = []

    @property
    def capacity(self) -> int:
        return 0 if self._base is None else self._base.nbytes

    def begin(self, sizes: Iterable[int]) -> None:
        """Start a layer whose tensors have these byte sizes (mapped anew if the current mapping is smaller;
        reserving more than is decoded costs nothing: untouched pages are never resident)."""
        nbytes = sum(-(-n // self.ALIGN) * self.ALIGN for n in sizes)
        if nbytes > self.capacity:
            self._base = None  # the old mapping goes first
            self._base = np.frombuffer(mmap.mmap(-1, nbytes), dtype=np.uint8)
        self._used, self._active = 0, True

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        start = -(-self._used // self.ALIGN) * self.ALIGN
        if not self._active or nbytes == 0 or start + nbytes > self.capacity:
            return torch.empty(shape, dtype=dtype)
        view = self._base[start : start + nbytes]
        self._handed.append(weakref.ref(view))
        self._used = start + nbytes
        return torch.from_numpy(view).view(dtype).view(shape)  # the tensor keeps ``view`` (and the mapping) alive

    def reset(self) -> None:
        """The layer's tensors are released: the next ``begin`` reuses the mapping, unless one is still held."""
        if any(ref() is not None for ref in self._handed):
            log.debug("a decoded weight outlived its layer: its mapping is left to it, the next layer maps anew")
            self._base = None
        self._handed.clear()
        self._used, self._active = 0, False
