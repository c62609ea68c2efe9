"""Append to a file around the page cache (``O_DIRECT``), through a ring of small aligned staging buffers.

A checkpoint is written once and not read back by the writer, so the page cache only costs: every buffered
``write`` copies the bytes into freshly allocated cache pages, and where fresh pages are expensive (a virtual
machine whose host backs guest memory lazily) that copy can be most of an export's time (the measurements are in
``experiments/bench/NOTES.md``).

Bytes are gathered in page-aligned staging buffers (a ring of :data:`STAGE_BUFFERS`) and written in whole aligned
blocks. A full buffer is queued at once to an I/O thread (``os.pwrite`` releases the GIL), which writes the queued
buffers back to back, while the caller fills the next one: a direct write mostly waits for the disk, so the shard
writer decodes, copies and hashes the next bytes meanwhile. Queuing a buffer as soon as it is full (rather than
after the previous write returned) keeps the disk busy across the threads' wake-ups: handed over one at a time, the
I/O thread would idle between writes while the caller's thread is scheduled. ``sync()`` writes everything gathered
so far (the last, partial block padded with zeros); ``close()`` cuts the file back to its true length. Where the
filesystem refuses ``O_DIRECT`` (tmpfs, some network filesystems, platforms without it), :func:`open_direct` returns
``None`` and callers write buffered as before. The file's bytes are the same either way. A filesystem that accepts
the flag but refuses the writes fails the export with an error naming ``export.direct_io=false``. By default
(``export.direct_io=null``) the shard writer uses it on local disk filesystems only (:data:`LOCAL_FILESYSTEMS`,
:func:`filesystem_type`).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

# where direct writes are the default: local disk filesystems (measured on ext4). Network and parallel
# filesystems (NFS, Lustre, ...) keep buffered writes unless asked: synchronous 1 MiB writes there are unmeasured.
LOCAL_FILESYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs"})
ALIGN = 4096  # file offsets, lengths and buffer addresses of direct writes are multiples of this
STAGE_BYTES = 1 << 20  # each staging buffer (default): resident once, reused for every write
MAX_STAGE_BYTES = 4 << 20
STAGE_BUFFERS = 4  # the ring: up to three full buffers queued for the I/O thread while the fourth fills
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_io: ThreadPoolExecutor | None = None


def _io_thread() -> ThreadPoolExecutor:
    """The one thread that runs every appender's background writes (in the order they were handed over)."""
    global _io
    if _io is None:
        _io = ThreadPoolExecutor(1, thread_name_prefix="slim-direct-io")
    return _io


def stage_bytes_for(queue_bytes: int) -> int:
    """Staging buffer size for a writer that may hold ``queue_bytes`` of queued tensors: 1/32 of it, from
    :data:`STAGE_BYTES` (1 MiB) to :data:`MAX_STAGE_BYTES` (4 MiB), so the ring is at most 1/8 of the queue
    beyond its smallest size. Bigger writes mean fewer hand-overs per byte where the queue is deep."""
    return min(MAX_STAGE_BYTES, max(STAGE_BYTES, _align_down(queue_bytes // 32)))


def _align_down(n: int) -> int:
    return n - n % ALIGN


def _align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class DirectAppender:
    """Append bytes to a file from byte offset ``pos`` on, with direct I/O.

    Bytes of the file before ``pos`` that share its block are read back first, so ``pos`` need not be aligned.
    The file holds everything passed to :meth:`write` once :meth:`sync` or :meth:`close` returns; between
    ``sync()`` and ``close()`` it may extend past :attr:`pos` by up to one block of zeros. Each full buffer is
    queued for the I/O thread and :meth:`write` goes on in the next one of the ring (waiting only when that one
    is still queued); an error of a queued write is raised by the :meth:`write` that next reuses its buffer,
    or by :meth:`sync` or :meth:`close`.
    """

    def __init__(self, fd: int, path: Path, pos: int, stage_bytes: int = STAGE_BYTES):
        """Use :func:`open_direct`; takes ownership of ``fd`` (opened with ``O_DIRECT``)."""
        if stage_bytes <= 0 or stage_bytes % ALIGN:
            raise ValueError(f"stage_bytes must be a positive multiple of {ALIGN}, got {stage_bytes}")
        self.path, self._fd, self._cap = path, fd, stage_bytes
        # page-aligned and private (counted as the process's own memory), touched once and reused
        self._stages = [mmap.mmap(-1, stage_bytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                        for _ in range(STAGE_BUFFERS)]
        self._views = [memoryview(m) for m in self._stages]
        self._queued: list[Future | None] = [None] * STAGE_BUFFERS  # each buffer's write, while queued or in flight
        self._slot = 0  # the buffer being filled
        self._view = self._views[0]
        self._base = _align_down(pos)  # file offset of the staged bytes' first one
        self._fill = pos - self._base
        if self._fill:  # the block already holds bytes before pos: keep them
            with open(path, "rb") as f:
                f.seek(self._base)
                head = f.read(self._fill)
            self._view[:len(head)] = head
            self._view[len(head):self._fill] = bytes(self._fill - len(head))  # a hole reads as zeros

    @property
    def pos(self) -> int:
        """File offset of the next byte :meth:`write` appends."""
        return self._base + self._fill

    def write(self, data: memoryview | bytes) -> int:
        mv = memoryview(data).cast("B")
        done = 0
        while done < len(mv):
            n = min(len(mv) - done, self._cap - self._fill)
            self._view[self._fill:self._fill + n] = mv[done:done + n]
            self._fill += n
            done += n
            if self._fill == self._cap:  # full: queued for the I/O thread, the next buffer is filled meanwhile
                self._queued[self._slot] = _io_thread().submit(self._pwrite, self._view, self._cap, self._base)
                self._slot = (self._slot + 1) % len(self._views)
                self._view = self._views[self._slot]
                self._base += self._cap
                self._fill = 0
                self._wait(self._slot)  # that buffer's earlier write is done: it is free for the next bytes
        return done

    def _wait(self, slot: int) -> None:
        """Until the write queued from buffer ``slot`` is done; raises its error."""
        future, self._queued[slot] = self._queued[slot], None
        if future is not None:
            future.result()

    def _wait_all(self) -> None:
        """Until every queued write is done; then raises the first error (oldest write first)."""
        ring, first = len(self._views), None
        for k in range(1, ring + 1):
            try:
                self._wait((self._slot + k) % ring)
            except Exception as exc:  # noqa: BLE001 - every write must end before the buffers may go
                first = first or exc
        if first is not None:
            raise first

    def sync(self) -> None:
        """Write every byte staged so far; the partial last block stays staged for the next writes."""
        self._wait_all()
        if not self._fill:
            return
        end = _align_up(self._fill)
        self._view[self._fill:end] = bytes(end - self._fill)
        self._pwrite(self._view, end, self._base)
        keep = _align_down(self._fill)
        if keep:  # whole blocks are on disk; move the partial one to the front of the buffer
            rest = self._fill - keep
            self._view[:rest] = self._view[keep:self._fill]
            self._base += keep
            self._fill = rest

    def close(self) -> None:
        """Write everything, cut the file to :attr:`pos`, close it and release the buffer."""
        try:
            self.sync()
            os.ftruncate(self._fd, self.pos)
        finally:
            self._release()

    def abandon(self) -> None:
        """Drop what is staged (after a failure) and close the file."""
        self._release()

    def _pwrite(self, view: memoryview, n: int, base: int) -> None:
        """Write the first ``n`` bytes of ``view`` (a multiple of ALIGN) at file offset ``base``."""
        done = 0
        try:
            while done < n:  # a short write leaves an aligned remainder; the next call continues it
                k = os.pwrite(self._fd, view[done:n], base + done)
                if k <= 0:
                    raise OSError(errno.EIO, f"direct write to {self.path} at offset {base + done} wrote nothing")
                done += k
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise OSError(exc.errno, f"direct write to {self.path} refused ({exc.strerror}); this filesystem "
                          "does not take O_DIRECT writes of 4096-byte blocks: rerun with export.direct_io=false"
                          ) from exc

    def _release(self) -> None:
        if self._fd < 0:
            return
        try:
            self._wait_all()  # the I/O thread must be done with the buffers and the descriptor
        except Exception:  # noqa: BLE001
            pass  # after a failure: the caller is handling that one, or sync()/close() raised this one already
        for view, stage in zip(self._views, self._stages):
            view.release()
            try:
                stage.close()
            except BufferError:  # a failed write's traceback still views it: unmapped when that goes
                pass
        os.close(self._fd)
        self._fd = -1


def filesystem_type(path: str | Path, mountinfo: str | None = None) -> str | None:
    """Type of the filesystem holding ``path`` (e.g. ``ext4``), from Linux's ``/proc/self/mountinfo`` (or the
    given text); None where that cannot be read."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best, fstype = -1, None
    for line in mountinfo.splitlines():
        fields, sep, rest = line.partition(" - ")
        fields, rest = fields.split(), rest.split()
        if not sep or len(fields) < 5 or not rest:
            continue
        mount_point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])  # \040 is a space
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best:  # the deepest mount; of equal ones the last (mounted on top)
            best, fstype = len(mount_point), rest[0]
    return fstype


def open_direct(path: Path, pos: int, stage_bytes: int = STAGE_BYTES) -> DirectAppender | None:
    """Open ``path`` (which exists) for direct appends from ``pos``; ``None`` where direct I/O is unavailable."""
    if not _O_DIRECT:
        return None
    try:
        fd = os.open(path, os.O_WRONLY | _O_DIRECT)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            return None
        raise
    try:
        return DirectAppender(fd, path, pos, stage_bytes)
    except BaseException:
        os.close(fd)
        raise
