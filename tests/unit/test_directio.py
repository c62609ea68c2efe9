"""Direct-I/O appends: every write the kernel sees is aligned, and the file's bytes are exactly what was appended,
whatever the chunking, the syncs in between, or an unaligned starting offset with bytes already in its block."""

import ctypes
import errno
import os
import random
import threading

import pytest
import torch

from slim import directio, export
from slim.directio import ALIGN, DirectAppender, open_direct
from slim.export import CheckpointWriter

STAGE = 3 * ALIGN  # a small staging buffer: many refills


@pytest.fixture
def aligned_writes(monkeypatch):
    """Record every pwrite and check what O_DIRECT demands of it: offset, length and address aligned."""
    seen = []
    real = os.pwrite

    def pwrite(fd, view, offset):
        addr = ctypes.addressof(ctypes.c_char.from_buffer(view))
        assert offset % ALIGN == 0 and len(view) % ALIGN == 0 and addr % ALIGN == 0, (offset, len(view), addr)
        seen.append((offset, len(view)))
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    return seen


def appender(path, pos):
    """A DirectAppender over a plain fd: the staging logic is the same, and any filesystem takes the writes."""
    return DirectAppender(os.open(path, os.O_WRONLY), path, pos, stage_bytes=STAGE)


@pytest.mark.parametrize("start", [0, 5, ALIGN, ALIGN + 77, 3 * ALIGN - 1])
def test_random_chunks_and_syncs_give_exactly_the_appended_bytes(tmp_path, aligned_writes, start):
    rng = random.Random(start)
    path = tmp_path / "f"
    prefix = rng.randbytes(start)
    path.write_bytes(prefix)
    expected = bytearray(prefix)
    app = appender(path, start)
    for _ in range(60):
        chunk = rng.randbytes(rng.choice([1, 100, ALIGN - 1, ALIGN, 2 * ALIGN + 3, 7 * ALIGN + 11]))
        assert app.write(memoryview(chunk)) == len(chunk)
        expected += chunk
        assert app.pos == len(expected)
        if rng.random() < 0.2:
            app.sync()  # everything so far is in the file; it may run one block of zeros past the end
            data = path.read_bytes()
            assert data[:len(expected)] == expected and len(data) - len(expected) < ALIGN
            assert not any(data[len(expected):])
    app.close()
    assert path.read_bytes() == expected
    assert len(aligned_writes) > 10


def test_unaligned_start_over_a_hole_keeps_zeros(tmp_path, aligned_writes):
    path = tmp_path / "f"
    path.write_bytes(b"")
    os.truncate(path, 10)  # the block before pos is a hole shorter than pos
    app = appender(path, 100)
    app.write(b"x" * 5000)
    app.close()
    assert path.read_bytes() == bytes(100) + b"x" * 5000


def test_real_direct_io_or_a_filesystem_that_refuses_it(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"head")
    app = open_direct(path, 4)
    if app is None:  # this filesystem (or platform) has no O_DIRECT: the caller falls back to buffered writes
        if directio._O_DIRECT:
            with pytest.raises(OSError) as exc:
                os.close(os.open(path, os.O_WRONLY | directio._O_DIRECT))
            assert exc.value.errno in (errno.EINVAL, errno.EOPNOTSUPP)
        return
    data = os.urandom(3 * directio.STAGE_BYTES + 12345)
    app.write(data)
    app.close()
    assert path.read_bytes() == b"head" + data


def test_a_refused_direct_write_names_the_setting(tmp_path, monkeypatch):
    def refuse(fd, view, offset):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "pwrite", refuse)
    (tmp_path / "f").touch()
    app = appender(tmp_path / "f", 0)
    app.write(b"x" * 10)
    with pytest.raises(OSError, match="export.direct_io=false"):
        app.close()


def test_full_buffers_are_queued_while_an_earlier_write_is_still_on_the_disk(tmp_path, monkeypatch):
    """The I/O thread must find the next buffer already queued when a write returns (no hand-over gap): with the
    first write held, write() still queues every full buffer but the one it fills, and waits only for a buffer
    of the ring that is still queued."""
    release, started, real = threading.Event(), [], os.pwrite

    def slow_first(fd, view, offset):
        started.append(offset)
        if offset == 0:
            assert release.wait(10)
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", slow_first)
    path = tmp_path / "f"
    path.touch()
    app = appender(path, 0)
    ring = len(app._views)
    data = os.urandom((ring + 1) * STAGE + 5)
    app.write(data[:(ring - 1) * STAGE])  # ring - 1 full buffers: all queued, none written yet, no waiting
    assert sum(f is not None and not f.done() for f in app._queued) == ring - 1
    blocked = threading.Thread(target=app.write, args=(data[(ring - 1) * STAGE:ring * STAGE],))
    blocked.start()  # fills the last free buffer; then needs the first one back: waits for the held write
    blocked.join(0.2)
    assert blocked.is_alive() and started == [0]
    release.set()
    blocked.join(10)
    app.write(data[ring * STAGE:])
    app.close()
    assert path.read_bytes() == data
    assert started[:ring + 1] == [k * STAGE for k in range(ring + 1)]  # in file order, one I/O thread


def test_an_error_of_a_queued_write_is_raised_after_every_write_in_flight_ended(tmp_path, monkeypatch):
    real, calls = os.pwrite, []

    def fail_second(fd, view, offset):
        calls.append(offset)
        if len(calls) == 2:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, view, offset)

    monkeypatch.setattr(os, "pwrite", fail_second)
    (tmp_path / "f").touch()
    app = appender(tmp_path / "f", 0)
    with pytest.raises(OSError, match="Input/output error"):
        app.write(os.urandom(20 * STAGE))  # raised when the failed write's buffer comes round again
        app.close()
    app.abandon()  # releases the buffers: every write queued from them has ended
    assert all(f is None or f.done() for f in app._queued) and app._fd == -1


@pytest.mark.parametrize("queue, stage", [(0, 1 << 20), (16 << 20, 1 << 20), (64 << 20, 2 << 20),
                                          (136 << 20, 4 << 20), (1 << 30, 4 << 20), ((96 << 20) + 123, 3 << 20)])
def test_staging_buffers_grow_with_the_writer_queue(queue, stage):
    assert directio.stage_bytes_for(queue) == stage and stage % ALIGN == 0


def test_writer_stages_in_buffers_sized_by_its_queue(tmp_path):
    assert CheckpointWriter(tmp_path / "a").stage_bytes == directio.STAGE_BYTES
    assert CheckpointWriter(tmp_path / "b", max_queued_bytes=256 << 20).stage_bytes == directio.MAX_STAGE_BYTES


def shard_bytes(out, direct_io, interrupt_at=None):
    """Write the same tensors through CheckpointWriter; optionally abandon at a commit point and resume."""
    g = torch.Generator().manual_seed(1)
    ts = [(f"t{i}", torch.randn(int(torch.randint(1, 3000, (1,), generator=g)), generator=g).to(dtype))
          for i, dtype in zip(range(30), [torch.float32, torch.bfloat16, torch.float16] * 10)]
    writer = CheckpointWriter(out, max_shard_bytes=20_000, direct_io=direct_io)
    state, used_direct, i = None, set(), 0
    while i < len(ts):
        if i == interrupt_at:  # a crash after the commit point: the rerun continues from the committed state
            writer.add("junk-after-the-commit", torch.ones(999))
            writer.abandon()
            writer = CheckpointWriter(out, max_shard_bytes=20_000, direct_io=direct_io)
            writer.restore(state[0])
            i, interrupt_at = state[1], None
        writer.add(*ts[i])
        used_direct.add(writer._current._direct is not None)
        writer.maybe_flush()
        i += 1
        if i % 4 == 0:
            state = writer.state(), i
    shards = writer.close()
    assert len(shards) > 3 and len(used_direct) == 1
    return [(out / f).read_bytes() for f, _, _ in shards], writer.checksums, used_direct.pop()


def test_shards_are_the_same_bytes_with_and_without_direct_io_and_after_a_resume(tmp_path, monkeypatch):
    (tmp_path / "probe").touch()
    probe = open_direct(tmp_path / "probe", 0)
    can_direct = probe is not None
    if probe is not None:
        probe.close()
    *buffered, used = shard_bytes(tmp_path / "buffered", direct_io=False)
    assert not used
    assert shard_bytes(tmp_path / "direct", direct_io=True) == (*buffered, can_direct)
    for at in (13, 18):  # committed at a shard boundary (13), inside a shard at an unaligned offset (18)
        assert shard_bytes(tmp_path / f"resumed{at}", direct_io=True, interrupt_at=at) == (*buffered, can_direct)
    monkeypatch.setattr(directio, "_O_DIRECT", 0)  # a platform without O_DIRECT writes buffered
    assert shard_bytes(tmp_path / "fallback", direct_io=True) == (*buffered, False)


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 252:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 27 0:40 / /scratch rw,relatime - nfs4 server:/export rw,vers=4.2
31 30 0:41 / /scratch/local\040disk rw,relatime - xfs /dev/nvme0n1 rw
32 27 0:42 / /mnt/lustre rw - lustre 10.0.0.1@o2ib:/fs rw
33 27 0:43 / /mnt/lustre rw - tmpfs tmpfs rw
"""


@pytest.mark.parametrize("path, fstype", [
    ("/", "ext4"), ("/home/user/run", "ext4"), ("/scratch", "nfs4"), ("/scratch/run/checkpoint", "nfs4"),
    ("/scratch/local disk/run", "xfs"),  # escaped space, nested mount
    ("/scratchpad", "ext4"),  # a name that only starts like a mount point
    ("/mnt/lustre/x", "tmpfs"),  # mounted over: the last line wins
])
def test_filesystem_type_is_the_deepest_mount_holding_the_path(path, fstype):
    assert directio.filesystem_type(path, MOUNTINFO) == fstype


@pytest.mark.parametrize("fstype, direct", [("ext4", True), ("xfs", True), ("nfs4", False), ("lustre", False),
                                            ("tmpfs", False), (None, False)])
def test_writer_goes_direct_by_default_on_local_disk_filesystems_only(tmp_path, monkeypatch, fstype, direct):
    monkeypatch.setattr(export, "filesystem_type", lambda path: fstype)
    assert CheckpointWriter(tmp_path / "auto").direct_io is direct
    assert CheckpointWriter(tmp_path / "forced", direct_io=not direct).direct_io is (not direct)
