"""Python's cyclic garbage collector around the two places where it costs seconds and finds nothing.

A full collection walks every tracked object. A model skeleton has many: ~0.5 M objects for the small
synthetic model (with the imports), 1.5 M for DeepSeek-R1 (61 layers of 256 experts), where one full
collection took 0.25 s and 0.67 s on a 2-core VM. Neither place makes reference cycles worth collecting:

- ``paused()`` while a skeleton is built: its allocations trigger collections that free nothing; building
  R1's skeleton took 8.2 s with the collector on, 4.6 s with it paused.
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
