"""Fused CPU kernels for the weight path (``cpu_kernels.c``), built on first use with the host's C compiler.

On a CPU the torch path makes about ten passes over every weight (FP8 decode, absmax, divide, round, clamp,
cast, dequantize, error, norms, packing) with a temporary each; these kernels make one, with the same bytes out
(tests compare them bit for bit with the torch path). They are an accelerator, not a requirement:

``hardware.cpu_kernels``  null (default): used when a C compiler builds them, else the torch path, with one log
                          line that says why; true: a build failure is an error; false: the torch path.

The library is compiled once per (source, compiler, CPU) into ``$SLIM_CACHE_DIR/kernels`` (default
``~/.cache/slim/kernels``) with ``-O3 -march=native -ffp-contract=off``
(no fused multiply-add, where torch rounds the product first) and loaded with ctypes, only if its sha256 matches the
one recorded when it was built and the cache directory is this user's alone (:mod:`slim.kernels.build`). A tensor is split into row
ranges across ``torch.get_num_threads()`` threads (or the count :func:`torch_single_threaded` kept): Python threads
for the synchronous calls (ctypes releases the GIL for each call), the library's own C worker threads for the
queued FP8 -> int4 calls of the streamed weight path (:func:`fp8_block_int4_submit`). On x86 CPUs with AVX-512
VBMI, FP8 -> int4 and FP8 -> bf16 go by lookup tables (:func:`lookup_tables`), the same bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import subprocess
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from slim.errors import SlimError
from slim.kernels import build

log = logging.getLogger(__name__)

ABI = 7  # SLIM_KERNELS_ABI in cpu_kernels.c
MAX_GROUP = 4096  # SLIM_MAX_GROUP in cpu_kernels.c
MIN_ROWS_PER_TASK = 64  # a thread gets at least this many rows (each call has a fixed cost to amortize)
Empty = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]  # allocates a kernel's output: empty(shape, dtype)

_enabled: bool | None = None  # hardware.cpu_kernels
_build_error = ""  # why the kernels are unavailable, for configure(True)'s message
_lock = threading.Lock()
_threads: int | None = None  # set by torch_single_threaded(): the kernels' thread count while torch has one


def configure(enabled: bool | None) -> None:
    """Set ``hardware.cpu_kernels`` for this process (the pipeline calls it once per run)."""
    global _enabled
    _enabled = enabled
    if enabled and library() is None:
        raise SlimError(f"hardware.cpu_kernels=true but the CPU kernels could not be built: {_build_error}; "
                        "install a C compiler (or set CC), or set hardware.cpu_kernels=null to fall back to torch")


def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None (switched off, or no compiler could build them)."""
    if _enabled is False:
        return None
    return _load()


@functools.cache
def _load() -> ctypes.CDLL | None:
    global _build_error
    with _lock:
        try:
            path = _build()
            lib = ctypes.CDLL(str(path))
        except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
            _build_error = str(exc).strip() or type(exc).__name__
            log.info("CPU kernels unavailable (%s); the weight path uses torch (slower on a CPU, same bytes)",
                     _build_error.splitlines()[0])
            return None
        lib.slim_kernels_abi.restype, lib.slim_int4_max_group.restype = ctypes.c_int, ctypes.c_int64
        lib.slim_task_size.restype = ctypes.c_int64
        found = (lib.slim_kernels_abi(), lib.slim_int4_max_group(), lib.slim_task_size())
        if found != (ABI, MAX_GROUP, ctypes.sizeof(_Task)):
            _build_error = (f"{path} has ABI, group limit and task size {found}, "
                            f"expected {(ABI, MAX_GROUP, ctypes.sizeof(_Task))}")
            log.warning("CPU kernels unavailable (%s)", _build_error)
            return None
        _declare(lib)
        lookup = " (FP8 -> int4 and bf16 by AVX-512 lookup tables)" if lib.slim_lut(-1) else ""
        log.info("fused CPU kernels: %s%s", path, lookup)
        return lib


def _declare(lib: ctypes.CDLL) -> None:
    i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.slim_fp8_block_decode.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, i64, i32, ptr]
    lib.slim_fp8_block_decode.restype = i64
    lib.slim_int4_quantize.argtypes = [ptr, i32, i64, i64, i64, i64, ptr, ptr, i32, ptr]
    lib.slim_fp8_block_int4.argtypes = [ptr, ptr, i64, i64, i64, i64, i32, i64, i64, i64, ptr, ptr, ptr, i32, ptr]
    lib.slim_pack_int4.argtypes = [ptr, i64, i64, i64, ptr]
    lib.slim_pack_int4.restype = i64
    lib.slim_lut.argtypes, lib.slim_lut.restype = [i32], i32
    lib.slim_task_submit.argtypes, lib.slim_task_submit.restype = [ctypes.POINTER(_Task), i32], i32
    lib.slim_task_wait.argtypes, lib.slim_task_wait.restype = [ctypes.POINTER(_Task)], None
    for name in ("slim_int4_quantize", "slim_fp8_block_int4"):
        getattr(lib, name).restype = None


def lookup_tables(on: bool | None = None) -> bool:
    """Whether :func:`fp8_block_int4` and :func:`fp8_block_decode` (to bf16) use their lookup-table paths (compiled
    in on x86 CPUs with AVX-512 VBMI; the same bytes and counts as the plain ones, and faster); ``on``
    switches them for this process (the tests compare the two paths)."""
    lib = library()
    return lib is not None and bool(lib.slim_lut(-1 if on is None else int(on)))


def _build() -> Path:
    """The library to load: the verified cached one, else built now (:mod:`slim.kernels.build`)."""
    return build.build(log)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype)


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slim-kernel")


def threads() -> int:
    """Threads a kernel call splits its rows across."""
    return _threads or torch.get_num_threads()


@contextlib.contextmanager
def torch_single_threaded():
    """Within: torch runs on one thread, the kernels keep torch's thread count. For the streamed weight path
    (calibration off), where the kernels do the work and torch only small ops: between those, torch's OpenMP
    threads spin waiting for the next parallel region and take the CPU the kernels and the writer need (with
    ``OMP_WAIT_POLICY=ACTIVE`` they spin all the longer)."""
    global _threads
    n, before = torch.get_num_threads(), _threads
    _threads = n
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        _threads = before


def row_ranges(rows: int) -> list[tuple[int, int]]:
    """How a call splits ``rows``: one range per thread (:func:`threads`), at least ``MIN_ROWS_PER_TASK`` rows each."""
    tasks = max(1, min(threads(), rows // MIN_ROWS_PER_TASK))
    step = -(-rows // tasks)
    return [(r, min(r + step, rows)) for r in range(0, rows, step)] or [(0, rows)]


def parallel_rows(rows: int, fn: Callable[[int, int], object]) -> list:
    """``fn(r0, r1)`` over the :func:`row_ranges` of ``rows``, on up to :func:`threads` threads."""
    bounds = row_ranges(rows)
    if len(bounds) == 1:
        return [fn(*bounds[0])]
    pool = _pool(threads())
    futures = [pool.submit(fn, r0, r1) for r0, r1 in bounds[1:]]
    first = fn(*bounds[0])  # this thread takes a share too
    return [first, *(f.result() for f in futures)]


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def check_block_scale(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """``scale_inv`` has one scale per ``block`` of ``q`` (ragged edges included); the error names both shapes.
    The kernels index the scales by block, so a mismatched shape would read out of bounds; ``slim.quant.fp8``
    (which sits above this module) checks with the same function."""
    (rows, cols), (bm, bn) = q.shape, block
    expected = (-(-rows // bm), -(-cols // bn))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with {bm}x{bn} blocks (expected {expected})")


def fp8_block_decode(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype,
                     out: torch.Tensor | None = None) -> tuple[torch.Tensor, int] | None:
    """DeepSeek block FP8 [rows, cols] (fp32 scales [ceil(rows/bm), ceil(cols/bn)]) -> ``dtype`` (bf16 or fp32),
    ragged edges included, into ``out`` when given, and the number of decoded values that are NaN or infinite;
    None where the kernels cannot (another device or dtype, or not loaded)."""
    lib = library()
    if (lib is None or q.device.type != "cpu" or q.dim() != 2 or q.dtype != torch.float8_e4m3fn
            or dtype not in (torch.bfloat16, torch.float32)):
        return None
    check_block_scale(q, scale_inv, block)
    q = q.contiguous().view(torch.uint8)
    scale = scale_inv.to(torch.float32).contiguous()
    rows, cols = q.shape
    if out is None:
        out = torch.empty(rows, cols, dtype=dtype)
    elif out.shape != q.shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(f"out must be a contiguous {dtype} CPU tensor of shape {tuple(q.shape)}")
    (bm, bn), out_bf16 = block, int(dtype == torch.bfloat16)
    qp, sp, op = _ptr(q), _ptr(scale), _ptr(out)
    return out, sum(parallel_rows(rows, lambda r0, r1: lib.slim_fp8_block_decode(qp, sp, cols, bm, bn, scale.shape[1],
                                                                                 r0, r1, out_bf16, op)))


def int4_supported(weight_dtype: torch.dtype, group_size: int, scale_dtype: torch.dtype | None) -> bool:
    """Whether :func:`int4_quantize` and :func:`fp8_block_int4` run for these dtypes and group size."""
    return (library() is not None and weight_dtype in (torch.bfloat16, torch.float32)
            and (scale_dtype or torch.float32) in (torch.bfloat16, torch.float32) and 0 < group_size <= MAX_GROUP)


class _Task(ctypes.Structure):
    """``slim_task`` in cpu_kernels.c: one slim_fp8_block_int4 call for the library's worker threads (its size is
    checked against the library's when it is loaded)."""

    _fields_ = [("q", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("cols", ctypes.c_int64), ("bm", ctypes.c_int64),
                ("bn", ctypes.c_int64), ("scale_cols", ctypes.c_int64), ("w_bf16", ctypes.c_int32),
                ("group", ctypes.c_int64), ("r0", ctypes.c_int64), ("r1", ctypes.c_int64),
                ("codes", ctypes.c_void_p), ("packed", ctypes.c_void_p), ("scale_out", ctypes.c_void_p),
                ("scale_bf16", ctypes.c_int32), ("sums", ctypes.c_double * 3), ("done", ctypes.c_int32),
                ("next", ctypes.c_void_p)]


class _Int4Call:
    """One int4 kernel call over a tensor's rows: outputs allocated by the caller's thread, ``run()`` splits the
    rows across the threads (:func:`parallel_rows`) and returns the parts, ``result(parts)`` adds them up:
    (codes, scales, sum w^2, sum error^2, non-finite count), and the packed words as a sixth item where the call
    packs them (``packed``). With ``task`` (the slim_fp8_block_int4 arguments before the rows, in order), ``tasks()``
    gives the same call as worker-thread tasks (:func:`fp8_block_int4_submit`), their sums the parts. The outputs
    come from ``empty(shape, dtype)`` (contiguous CPU tensors; the call writes every element)."""

    def __init__(self, rows: int, cols: int, group_size: int, scale_dtype: torch.dtype | None, call: Callable,
                 packed: bool = False, task: tuple | None = None, codes: bool = True, empty: Empty = _empty):
        scale_dtype = scale_dtype or torch.float32
        self.rows, self.call = rows, call  # call(r0, r1, codes_ptr, packed_ptr, scale_ptr, scale_bf16, sums)
        # without codes (packed only): a meta tensor, their shape and dtype, where the call would have stored them
        self.codes = empty((rows, cols), torch.int8) if codes else torch.empty(rows, cols, dtype=torch.int8,
                                                                                 device="meta")
        self.packed = empty((rows, cols // 8), torch.int32) if packed else None
        self.scale = empty((rows, cols // group_size), scale_dtype)
        self.args = (_ptr(self.codes) if codes else None, None if self.packed is None else _ptr(self.packed),
                     _ptr(self.scale), int(scale_dtype == torch.bfloat16))
        self.task = task

    def tasks(self) -> list[_Task]:
        return [_Task(*self.task, r0, r1, *self.args) for r0, r1 in row_ranges(self.rows)]

    def _rows(self, r0: int, r1: int) -> ctypes.Array:
        sums = (ctypes.c_double * 3)()
        self.call(r0, r1, *self.args, sums)
        return sums

    def run(self) -> list:
        return parallel_rows(self.rows, self._rows)

    def result(self, parts: list) -> tuple:
        out = (self.codes, self.scale, sum(p[0] for p in parts), sum(p[1] for p in parts),
               int(sum(p[2] for p in parts)))
        return out if self.packed is None else (*out, self.packed)


def int4_quantize(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype | None
                  ) -> tuple[torch.Tensor, torch.Tensor, float, float] | None:
    """Symmetric int4 per group with the minmax observer: (int8 codes [out, in], scales [out, in // group] in
    ``scale_dtype`` (fp32 when None), sum of w^2, sum of (w_q - w)^2); None where the kernels cannot."""
    if (weight.device.type != "cpu" or weight.dim() != 2 or not int4_supported(weight.dtype, group_size, scale_dtype)
            or weight.shape[1] % group_size):
        return None
    lib, w = library(), weight.contiguous()
    wp, w_bf16, cols = _ptr(w), int(w.dtype == torch.bfloat16), w.shape[1]
    call = _Int4Call(w.shape[0], cols, group_size, scale_dtype,
                     lambda r0, r1, cp, _, sp, s_bf16, sums: lib.slim_int4_quantize(wp, w_bf16, cols, group_size, r0,
                                                                                      r1, cp, sp, s_bf16, sums))
    codes, scale, signal, noise, _ = call.result(call.run())
    return codes, scale, signal, noise


def _fp8_block_int4_call(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], weight_dtype: torch.dtype,
                         group_size: int, scale_dtype: torch.dtype | None, pack: bool, codes: bool,
                         empty: Empty = _empty) -> _Int4Call | None:
    if not (codes or pack):
        raise ValueError("codes=False needs pack=True: the call would store nothing")
    if (not q.is_cpu or q.dim() != 2 or q.dtype != torch.float8_e4m3fn
            or not int4_supported(weight_dtype, group_size, scale_dtype)
            or q.shape[1] % group_size or (pack and group_size % 8)):
        return None
    check_block_scale(q, scale_inv, block)
    lib, q, scale = library(), q.contiguous(), scale_inv.to(torch.float32).contiguous()  # the same tensors if so
    qp, fp, w_bf16, (rows, cols), (bm, bn) = _ptr(q), _ptr(scale), int(weight_dtype == torch.bfloat16), q.shape, block
    scale_cols = scale.shape[1]

    def call(r0, r1, cp, pp, sp, s_bf16, sums, _keep=(q, scale)):  # _keep: the inputs live as long as the call
        lib.slim_fp8_block_int4(qp, fp, cols, bm, bn, scale_cols, w_bf16, group_size, r0, r1, cp, pp, sp, s_bf16,
                                sums)

    task = (qp, fp, cols, bm, bn, scale_cols, w_bf16, group_size)  # _Task's fields up to r0, in order
    return _Int4Call(rows, cols, group_size, scale_dtype, call, packed=pack, task=task, codes=codes, empty=empty)


def fp8_block_int4(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], weight_dtype: torch.dtype,
                   group_size: int, scale_dtype: torch.dtype | None, pack: bool = False,
                   codes: bool = True) -> tuple | None:
    """``int4_quantize(fp8_block_decode(q, scale_inv, block, weight_dtype), ...)`` in one pass, the decoded weight
    never stored, plus the number of decoded values that are NaN or infinite; with ``pack`` also the codes as
    :func:`pack_int4`'s int32 words, packed in the same pass (a sixth item; needs ``group_size % 8 == 0``). With
    ``pack`` and ``codes=False`` the int8 codes are not stored (a byte per weight, written and freed for nothing
    where only the words go to disk): the first item is then a meta tensor of their shape. None where the kernels
    cannot."""
    call = _fp8_block_int4_call(q, scale_inv, block, weight_dtype, group_size, scale_dtype, pack, codes)
    return None if call is None else call.result(call.run())


def fp8_block_int4_submit(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                          weight_dtype: torch.dtype, group_size: int, scale_dtype: torch.dtype | None,
                          pack: bool = False, codes: bool = True, empty: Empty = _empty
                          ) -> Callable[[], tuple] | None:
    """:func:`fp8_block_int4` queued for the library's worker threads (``slim_task_submit``: C threads, no GIL, as
    many as :func:`threads`, one task per :func:`row_ranges` range) while the caller goes on; returns the call that
    waits for and gives its result (None where the kernels cannot). Tasks run in the order they were queued. The
    streamed weight path queues the next weights' kernels while it reports and writes one, their outputs from
    ``empty(shape, dtype)`` (default ``torch.empty``; it reuses written ones).
    Where no worker thread can be started, the kernel runs here before this returns."""
    call = _fp8_block_int4_call(q, scale_inv, block, weight_dtype, group_size, scale_dtype, pack, codes, empty)
    if call is None:
        return None
    lib, tasks = library(), call.tasks()
    if lib.slim_task_submit(tasks[0], threads()) != 0:
        log.warning("could not start a kernel worker thread; quantizing on the calling thread")
        parts = call.run()
        return lambda: call.result(parts)
    for task in tasks[1:]:
        lib.slim_task_submit(task, threads())  # a worker runs: queuing cannot fail
    return _Queued(lib, call, tasks)


class _Queued:
    """The result of queued tasks (:func:`fp8_block_int4_submit`). Holds the call (its inputs and outputs) and the
    tasks until every task is done: dropped unasked (an error between queuing and asking), it still waits for
    them, so no worker reads or writes memory that was freed."""

    _getpid = staticmethod(os.getpid)  # held here: __del__ may run while the interpreter tears modules down

    def __init__(self, lib: ctypes.CDLL, call: _Int4Call, tasks: list[_Task]):
        self.lib, self.call, self.tasks, self.pid, self.waited = lib, call, tasks, self._getpid(), False

    def _wait(self) -> None:
        if self.waited or self._getpid() != self.pid:  # a forked child's copy: the parent's workers run these
            return  # tasks, not its own
        for task in self.tasks:
            self.lib.slim_task_wait(task)  # releases the GIL while it waits
        self.waited = True

    def __call__(self) -> tuple:
        self._wait()
        return self.call.result([task.sums for task in self.tasks])

    def __del__(self):
        self._wait()


def pack_int4(codes: torch.Tensor) -> tuple[torch.Tensor, int] | None:
    """int8 codes [out, in] (in % 8 == 0) -> compressed-tensors' int32 words [out, in // 8] and how many codes
    lie outside [-8, 7] (the caller refuses those); None where the kernels cannot."""
    lib = library()
    if lib is None or codes.device.type != "cpu" or codes.dim() != 2 or codes.shape[1] % 8 or codes.dtype != torch.int8:
        return None
    c = codes.contiguous()
    rows, cols = c.shape
    out = torch.empty(rows, cols // 8, dtype=torch.int32)
    cp, op = _ptr(c), _ptr(out)
    bad = sum(parallel_rows(rows, lambda r0, r1: lib.slim_pack_int4(cp, cols, r0, r1, op)))
    return out, bad
