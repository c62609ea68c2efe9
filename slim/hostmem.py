"""Host allocator policy for the layer loop (glibc only; elsewhere nothing changes).

By default glibc gives every allocation of 128 KiB or more fresh pages from the kernel and returns them on
free (its adaptive threshold is also frozen once any library sets one). The layer loop allocates and frees
float32 temporaries of ~1 MB per row block of every weight, so each of them page-faults anew: measured on a
DeepSeek-R1-shaped layer on CPU, about half of the quantize time. Up to ``MMAP_THRESHOLD`` allocations come from
the heap instead and stay there for the next block, and the heap keeps up to ``TRIM_THRESHOLD`` free at its top.
Larger allocations (a layer's weights) still get their own pages and go back to the kernel when freed, so peak
memory stays one layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 64 << 20


def keep_temporaries_in_heap() -> bool:
    """Set glibc's mmap and trim thresholds (see module docstring); False where that is not glibc or
    ``SLIM_MALLOPT=0`` asks to leave the allocator alone."""
    if os.environ.get("SLIM_MALLOPT", "1") == "0":
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:  # musl, macOS, Windows: no mallopt
        return False
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("mallopt mmap threshold %d MiB, trim threshold %d MiB: %s", MMAP_THRESHOLD >> 20,
              TRIM_THRESHOLD >> 20, "set" if ok else "refused")
    return ok
