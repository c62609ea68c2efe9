"""Python's cyclic garbage collector around the two places where it costs seconds and finds nothing.

A full collection walks every tracked object, and a model skeleton has many: hundreds of thousands for a small
model (with the imports), over a million for DeepSeek-R1 (61 layers of 256 experts), so every full collection
costs a noticeable pause. Neither place makes reference cycles worth collecting:

- ``paused()`` while a skeleton is built: its allocations trigger collections that free nothing, and that
  repeated walking would be a large share of the build time.
- ``long_lived_frozen()`` around the layer loop: the skeleton and the imported modules live for the whole loop,
  so they are moved out of the collector's generations (``gc.freeze``) and its full collections walk only
  what the loop allocates. Refcounting still frees frozen objects that die; only cycles among them wait
  until the block ends and ``gc.unfreeze`` hands them back.
"""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def paused():
    """Within: no automatic collection (restored as it was on exit, also after an error)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextlib.contextmanager
def long_lived_frozen():
    """Within: the objects alive on entry are left out of collections (one full collection first, so garbage
    that exists now is freed rather than frozen)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
