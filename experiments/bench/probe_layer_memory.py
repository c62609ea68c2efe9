"""Diagnostic: RSS split (anonymous / file-backed) after every layer of a slim run, with what-if switches.

    python experiments/bench/probe_layer_memory.py [--close-shards] [--malloc-trim] -- model.path=DIR eval=none logger=none ...
    MALLOC_MMAP_THRESHOLD_=131072 python experiments/bench/probe_layer_memory.py -- model.path=DIR ...

Runs ``python -m slim.main <overrides>`` in this process and prints ``VmRSS / RssAnon / RssFile`` (MiB) each
time slim releases a module. The switches try changes slim does not make (yet), to see what each is worth:

- ``--close-shards``: drop the checkpoint reader's open safetensors handles after each layer (their memory
  maps keep every page read so far resident and counted in RSS, growing with depth);
- ``--malloc-trim``: call glibc ``malloc_trim(0)`` after each layer (returns freed heap pages to the OS).

It patches slim's internals from outside (``slim.quantize.release``, ``CheckpointReader._handles``): a probe,
not a fix.
"""

from __future__ import annotations

import argparse
import ctypes
import runpy
import sys


def status_mib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) // 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--close-shards", action="store_true")
    p.add_argument("--malloc-trim", action="store_true")
    p.add_argument("overrides", nargs="*", help="slim.main overrides (after --)")
    args = p.parse_args()

    import slim.quantize as quantize
    from slim.models import checkpoint

    readers = []
    init = checkpoint.CheckpointReader.__init__

    def tracked_init(self, *a, **k):
        init(self, *a, **k)
        readers.append(self)

    checkpoint.CheckpointReader.__init__ = tracked_init
    libc = ctypes.CDLL("libc.so.6")
    release = quantize.release
    count = 0

    def probed_release(module):
        nonlocal count
        release(module)
        if args.close_shards:
            for r in readers:
                r._handles.clear()
        if args.malloc_trim:
            libc.malloc_trim(0)
        count += 1
        print(f"release {count:3d}: " + "  ".join(f"{k} {v} MiB" for k, v in status_mib().items()), flush=True)

    quantize.release = probed_release
    sys.argv = ["slim.main", *args.overrides]
    runpy.run_module("slim.main", run_name="__main__")


if __name__ == "__main__":
    main()
