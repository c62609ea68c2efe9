"""Host allocator policy: the one owner of glibc's ``mallopt``/``malloc_trim`` calls (glibc only; elsewhere, and
under ``SLIM_MALLOPT=0``, nothing changes).

Every run starts with :func:`return_freed_memory_to_os`; the CPU weight path then applies
:func:`keep_temporaries_in_heap` for its own temporaries.

glibc serves large allocations (128 KiB and up, by default) with pages of their own and returns them to the
kernel on free. The CPU weight path allocates and frees float32 temporaries of ~1 MB per row block of every
weight, so each one page-faults anew, and those faults would be a large share of ``quantize_model``'s time on
R1-sized layers. ``keep_temporaries_in_heap`` serves
allocations up to ``MMAP_THRESHOLD`` from the heap, which keeps up to ``TRIM_THRESHOLD`` free at its top for
the next block. Heap pages freed below live chunks are not returned by free(), so ``release_free_heap``
(glibc's ``malloc_trim``), called after each layer, hands them back: peak memory stays one layer at any depth.
Buffers used again in every layer are kept in a :class:`TensorPool` instead, so they are not faulted in anew.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from collections import defaultdict

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


def return_freed_memory_to_os() -> bool:
    """Serve allocations of 128 KiB and up with pages of their own, returned to the kernel on free (the same as
    ``MALLOC_MMAP_THRESHOLD_=131072``): layer-sized tensors allocated and freed over and over would otherwise
    stay in glibc's heap as RSS that grows with depth. The policy of every run; the CPU weight path then raises
    the threshold for its own temporaries (:func:`keep_temporaries_in_heap`). False where that is not glibc or
    ``SLIM_MALLOPT=0`` asks to leave the allocator alone."""
    libc = _libc()
    return libc is not None and libc.mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1


def release_free_heap() -> None:
    """Return every free heap page to the kernel (glibc ``malloc_trim(0)``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


ONEDNN_CACHE = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
IDEEP_CACHE = "LRU_CACHE_CAPACITY"


def no_gemm_kernel_cache() -> None:
    """torch's CPU matmuls keep what they build for every GEMM shape in two caches of up to 1024 entries:
    oneDNN's kernels (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and, for bf16, ideep's primitives around them
    (``LRU_CACHE_CAPACITY``). Calibrating routed experts gives every expert of every layer its own token count,
    so both would grow with depth, against the rule that peak memory stays one layer; the kernels are rebuilt
    instead, which costs no measurable time. oneDNN's is turned off and ideep's kept to one entry unless the
    environment sets them (ideep's at 0 crashes torch 2.13 with a segmentation fault at the first bf16 matmul).
    Both are read at the first matmul, so call this before any."""
    os.environ.setdefault(ONEDNN_CACHE, "0")
    os.environ.setdefault(IDEEP_CACHE, "1")


class TensorPool:
    """Spare tensors for reuse, by shape and dtype: ``empty`` hands out a spare one or a new one, ``give`` takes
    back tensors nothing else uses any more. Spares are kept while they hold at most ``limit`` bytes (the others are
    freed). The streamed weight path's kernel outputs, a few per routed expert, come from one pool: with
    ``release_free_heap`` after every layer they would page-fault anew in each layer; reused, they are faulted in
    once."""

    def __init__(self, limit: int):
        self.limit, self.spare_bytes = limit, 0
        self._spare: defaultdict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = defaultdict(list)
        self._ids: set[int] = set()  # of the spare tensors

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        spare = self._spare.get((tuple(shape), dtype))
        if spare:
            tensor = spare.pop()
            self._ids.discard(id(tensor))
            self.spare_bytes -= tensor.nbytes
            return tensor
        return torch.empty(shape, dtype=dtype)

    def give(self, *tensors: torch.Tensor | None) -> None:
        """Keep ``tensors`` (None and meta ones skipped) for ``empty``; the caller must hold no other use of them."""
        for tensor in tensors:
            if (tensor is None or tensor.is_meta or id(tensor) in self._ids  # given twice: handed out once only
                    or self.spare_bytes + tensor.nbytes > self.limit):
                continue
            self._spare[(tuple(tensor.shape), tensor.dtype)].append(tensor)
            self._ids.add(id(tensor))
            self.spare_bytes += tensor.nbytes
