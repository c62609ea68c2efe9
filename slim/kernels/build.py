"""Building the CPU kernel library into ``$SLIM_CACHE_DIR/kernels`` and trusting only what slim built there.

A shared library is code: loading one that someone else wrote runs their code in this process. So:

- The cache directories (``$SLIM_CACHE_DIR`` and its ``kernels/``) must be owned by this user and writable by no
  one else; otherwise the library is refused with an error that names the fix (``chmod go-w``, or another
  ``SLIM_CACHE_DIR``). Anyone who could write there could replace both the library and its record.
- Each build records, next to the library, the sha256 of the library file and of the source it was compiled from
  (``cpu_kernels-<key>.json``). A cached library is loaded only when it is a regular file (no link) whose sha256
  matches the record and the record's source digest matches ``cpu_kernels.c``; anything else (a truncated, replaced
  or foreign file, a missing record) is rebuilt.
- The library is content-addressed (``cpu_kernels-<key>-<sha256[:16]>.so``): ranks building at once each install a
  whole file and the record names one of them; nothing is rewritten in place.

``key`` hashes what the machine code depends on: source, flags, compiler version, architecture and CPU features.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

from slim.cache import cache_dir

SOURCE = Path(__file__).with_name("cpu_kernels.c")
FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c11", "-pthread"]
NATIVE = ["-march=native"]  # tried first; without it where the compiler refuses it


class UntrustedCache(RuntimeError):
    """The cache directory could be written by another user: no library is loaded from it."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _cpu_identity() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags (Linux), else the platform's processor string.
    Part of the cache key, so nodes with other CPUs sharing a home directory build their own library."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features", "isa")):
                    return line
    except OSError:
        pass
    return platform.processor()


def compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        raise RuntimeError("no C compiler found (cc, gcc, clang; or set CC)")
    return cc


def check_private(directory: Path) -> None:
    """``directory`` and the cache root above it (those that exist) belong to this user and no one else can write
    them; raises :class:`UntrustedCache` naming the fix."""
    root = cache_dir()
    for d in {directory, root}:
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode) and d != root:
            raise UntrustedCache(f"{d} is a symbolic link; remove it (slim recreates it) or set SLIM_CACHE_DIR to a "
                                 "directory of yours")
        st = os.stat(d)
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise UntrustedCache(f"{d} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): a library "
                                 "there could be anyone's code; set SLIM_CACHE_DIR to a directory of yours")
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UntrustedCache(f"{d} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}), so a "
                                 f"library there could be anyone's code; run: chmod go-w {d} (or set SLIM_CACHE_DIR "
                                 "to a private directory)")


def _key(cc: str) -> tuple[str, str]:
    """(cache key, sha256 of the source)."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(x.encode() if isinstance(x, str) else x for x in (
        source, " ".join(FLAGS + NATIVE), version, platform.machine(), _cpu_identity()))).hexdigest()[:16]
    return key, hashlib.sha256(source).hexdigest()


def verified(out_dir: Path, key: str, source_sha256: str) -> tuple[Path | None, str]:
    """The cached library its record vouches for, or (None, why not)."""
    record_path = out_dir / f"cpu_kernels-{key}.json"
    if not record_path.is_file():
        return None, "no build record"
    try:
        record = json.loads(record_path.read_text())
        lib = out_dir / record["library"]
        want_lib, want_src = record["library_sha256"], record["source_sha256"]
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"unreadable build record {record_path.name} ({exc})"
    if lib.parent != out_dir or lib.name != Path(record["library"]).name:
        return None, f"build record names {record['library']!r}, outside {out_dir}"
    if want_src != source_sha256:
        return None, "built from another cpu_kernels.c"
    if lib.is_symlink() or not lib.is_file():
        return None, f"{lib.name} is missing or not a regular file"
    if sha256_file(lib) != want_lib:
        return None, f"{lib.name} does not match the sha256 recorded when it was built"
    return lib, ""


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def build(log) -> Path:
    """A library of this source for this compiler and CPU, verified or freshly built (see module docstring)."""
    cc = compiler()
    key, source_sha256 = _key(cc)
    out_dir = cache_dir() / "kernels"
    check_private(out_dir)
    if out_dir.is_dir():
        lib, why = verified(out_dir, key, source_sha256)
        if lib is not None:
            return lib
        if why != "no build record" or any(out_dir.glob(f"cpu_kernels-{key}*.so")):
            log.warning("cached CPU kernels in %s not trusted (%s); rebuilding", out_dir, why)
    for d in (out_dir.parent, out_dir):  # made private whatever the umask (mkdir's parents= would not apply the mode)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
    check_private(out_dir)  # as created (a directory made meanwhile by someone else is refused here)
    errors = []
    for extra in (NATIVE, []):
        fd, tmp = tempfile.mkstemp(prefix=f"cpu_kernels-{key}.", suffix=".tmp", dir=out_dir)
        os.close(fd)
        proc = subprocess.run([cc, *FLAGS, *extra, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode == 0:
            digest = sha256_file(Path(tmp))
            target = out_dir / f"cpu_kernels-{key}-{digest[:16]}.so"
            os.replace(tmp, target)  # atomic; content-addressed, so a concurrent build installs the same bytes or
            _atomic_write(out_dir / f"cpu_kernels-{key}.json", json.dumps({  # a file of its own name
                "library": target.name, "library_sha256": digest, "source": SOURCE.name,
                "source_sha256": source_sha256, "compiler": cc, "flags": FLAGS + extra}, indent=1) + "\n")
            return target
        os.unlink(tmp)
        errors.append(proc.stderr.strip() or f"{cc} exited {proc.returncode}")
    raise RuntimeError(f"{cc} could not build {SOURCE.name}: {errors[-1]}")
