"""Tensor digests for ``slim_manifest.json`` (``export.checksum``): which hash, and how to make one.

The manifest exists to catch a checkpoint whose bytes changed after export (a truncated copy, a flipped bit, a shard
from another run), not to authenticate it against an adversary, so the default is XXH3-128 (the ``xxhash`` package):
a non-cryptographic 128-bit hash, many times faster per core than sha256, which would otherwise be a sizeable share
of a calibration-off export's CPU time. ``sha256`` stays available where a cryptographic digest is wanted. The
manifest names its algorithm, and each tensor's entry keys its digest by that name (``{"file": ...,
"xxh3_128": "..."}``), so ``slim.verify`` reads manifests of either kind.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import xxhash

DEFAULT = "xxh3_128"


class Hasher(Protocol):
    def update(self, data, /) -> None: ...

    def hexdigest(self) -> str: ...


# name -> (constructor, worth hashing on a helper thread beside the write: slow, and releases the GIL)
_ALGORITHMS = {
    "xxh3_128": (xxhash.xxh3_128, False),
    "sha256": (hashlib.sha256, True),
}
ALGORITHMS = tuple(_ALGORITHMS)


def new(algorithm: str) -> Hasher:
    """A fresh hasher for ``algorithm`` (one of :data:`ALGORITHMS`)."""
    try:
        return _ALGORITHMS[algorithm][0]()
    except KeyError:
        raise ValueError(f"checksum algorithm {algorithm!r} is unknown; slim knows: {', '.join(ALGORITHMS)}") from None


def hash_beside(algorithm: str) -> bool:
    """Is ``algorithm`` slow enough that a large buffer is better hashed on a helper thread while it is written?"""
    return _ALGORITHMS[algorithm][1]
