"""slim.kernels: the fused CPU kernels give the torch path's bytes, bit for bit, on random and adversarial input."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil

import pytest
import torch
from compressed_tensors.compressors import pack_to_int32

from slim import kernels
from slim.errors import SlimError
from slim.kernels import build
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8_block, quantize_fp8_block
from slim.quant.schemes import SCHEMES

HAS_CC = any(shutil.which(c) for c in ("cc", "gcc", "clang"))


@pytest.fixture
def torch_path():
    """Run the body with the kernels switched off (the reference), then switch them back on."""
    kernels.configure(False)
    yield
    kernels.configure(None)


def off(fn, *args, **kwargs):
    kernels.configure(False)
    try:
        return fn(*args, **kwargs)
    finally:
        kernels.configure(None)


@contextlib.contextmanager
def lookup_switched(on: bool):
    """The kernels' lookup-table paths switched ``on`` (or off) inside the block, back as they were after it;
    yields the state the switch reports."""
    before = kernels.lookup_tables()
    try:
        yield kernels.lookup_tables(on)
    finally:
        assert kernels.lookup_tables(before) is before


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 1: torch.int8}[t.element_size()])


def test_the_kernels_build_where_a_compiler_is():
    assert (kernels.library() is not None) == HAS_CC, kernels._build_error


pytestmark = pytest.mark.skipif(not HAS_CC, reason="no C compiler: the torch path is the only one")


@pytest.mark.parametrize("scale", [1.0, 3.7e-3, 2.0**-20, 2.0**-140, 1e30, float(torch.finfo(torch.float32).max / 100)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("lookup", [True, False])
def test_decode_every_code_bit_for_bit(scale, dtype, lookup):
    """All 256 codes (zeros, subnormals, normals, NaN, both signs) times normal, tiny, subnormal and overflowing
    scales: the bits of ``(q.float() * s).to(dtype)``, NaN and inf included, and the non-finite count; by lookup
    tables (bf16, where compiled in) and the plain way."""
    codes = torch.arange(256, dtype=torch.uint8).repeat(3, 1).view(FP8_DTYPE)  # [3, 256]: two block columns
    s = torch.tensor([[scale, -scale * 0.75]], dtype=torch.float32)
    with lookup_switched(lookup):
        got, nonfinite = kernels.fp8_block_decode(codes, s, (128, 128), dtype)
    want = (codes.float() * s.repeat_interleave(128, 1)).to(dtype)
    assert torch.equal(bits(got), bits(want))
    assert nonfinite == int((~torch.isfinite(want.float())).sum()) >= 6  # the NaN codes at least


@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (1, 7), (129, 128)])
def test_decode_ragged_blocks_matches_the_torch_path(shape):
    torch.manual_seed(0)
    q, s = quantize_fp8_block(torch.randn(shape) * 0.05)
    want = off(dequantize_fp8_block, q, s)
    got = dequantize_fp8_block(q, s)
    assert torch.equal(bits(got), bits(want))
    out = torch.empty(shape, dtype=torch.bfloat16)
    assert kernels.fp8_block_decode(q, s, (128, 128), torch.bfloat16, out=out)[0] is out and torch.equal(out, want)
    with pytest.raises(ValueError, match="does not match weight"):
        kernels.fp8_block_decode(q, s[:0], (128, 128), torch.bfloat16)


def adversarial_weight(rows: int, cols: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    """Random groups plus: all-zero groups, ties (w / s exactly k + 1/2), tiny and huge magnitudes."""
    torch.manual_seed(1)
    w = torch.randn(rows, cols) * 0.02
    w[0, :group] = 0.0
    tie = torch.tensor([7.5, 2.5, -3.5, 0.5, -0.5, 1.5, -6.5, 4.5] * (group // 8 + 1))[:group]
    w[1, :group] = tie  # absmax 7.5 -> scale 1.0 exactly: rint(w / s) meets every tie
    w[2, :group] = torch.randn(group) * 1e-30
    w[3 % rows, :group] = torch.randn(group) * 1e15  # squares still within fp32
    w[4 % rows, group : 2 * group] = -torch.rand(group)  # negative absmax
    return w.to(dtype)


@pytest.mark.parametrize("group", [128, 64, 32, 24])
@pytest.mark.parametrize("dtype,scale_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, None),
                                               (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_int4_matches_the_scheme_bit_for_bit(group, dtype, scale_dtype):
    w = adversarial_weight(70, group * 6, group, dtype)
    ref = off(SCHEMES["w4a8_dynamic"].quantize, w.float(), None, group, "minmax", scale_dtype)
    codes, scale, signal, noise = kernels.int4_quantize(w, group, scale_dtype)
    assert torch.equal(codes, ref.weight)
    assert scale.dtype == ref.weight_scale.dtype and torch.equal(bits(scale), bits(ref.weight_scale))
    w64 = w.double()
    err = codes.double().view(70, -1, group).mul(scale.double()[..., None]).view_as(w64) - w64
    assert signal == pytest.approx(float(w64.square().sum()), rel=1e-5)
    # each error is c * s - w in fp32 (as the torch path computes it), summed: near the exact sum of squares
    assert noise == pytest.approx(float(err.square().sum()), rel=1e-4)


def test_int4_refuses_what_it_does_not_do():
    w = torch.randn(8, 256, dtype=torch.bfloat16)
    assert kernels.int4_quantize(w, 96, None) is None  # 256 % 96: the torch path names the error
    assert kernels.int4_quantize(w.half(), 128, None) is None
    assert kernels.int4_quantize(w, 128, torch.float16) is None
    assert kernels.int4_quantize(w, kernels.MAX_GROUP * 2, None) is None


@pytest.mark.parametrize("shape,group", [((300, 512), 128), ((129, 384), 64), ((64, 512), 256), ((5, 96), 32)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_straight_to_int4_is_decode_then_quantize(shape, group, dtype):
    """Groups inside a block column, across two (group 256), ragged row blocks: the bytes of materializing the
    weight in ``dtype`` and quantizing that."""
    torch.manual_seed(2)
    q, s = quantize_fp8_block(torch.randn(shape) * 0.05)
    q.view(torch.uint8)[0, :8] = 0  # an all-zero start of a group
    weight = off(dequantize_fp8_block, q, s, dtype=dtype)
    ref = off(SCHEMES["w4a8_dynamic"].quantize, weight.float(), None, group, "minmax", torch.bfloat16)
    codes, scale, signal, noise, nonfinite = kernels.fp8_block_int4(q, s, (128, 128), dtype, group, torch.bfloat16)
    assert torch.equal(codes, ref.weight) and torch.equal(bits(scale), bits(ref.weight_scale))
    assert nonfinite == 0
    assert (signal, noise) == pytest.approx(kernels.int4_quantize(weight, group, torch.bfloat16)[2:], rel=1e-6)
    q.view(torch.uint8)[shape[0] - 1, 3] = 0xFF
    assert kernels.fp8_block_int4(q, s, (128, 128), dtype, group, torch.bfloat16)[4] == 1


def test_pack_matches_compressed_tensors():
    torch.manual_seed(3)
    codes = torch.randint(-8, 8, (77, 256), dtype=torch.int8)
    packed, bad = kernels.pack_int4(codes)
    assert torch.equal(packed, pack_to_int32(codes, 4)) and bad == 0
    assert kernels.pack_int4(codes[:, :250]) is None  # not whole words: compressed-tensors' packer
    codes[5, 17], codes[70, 200], codes[0, 0] = 8, -9, 127
    assert kernels.pack_int4(codes)[1] == 3  # out of [-8, 7]: counted in the same pass


def test_thread_count_does_not_change_the_bytes():
    torch.manual_seed(4)
    q, s = quantize_fp8_block(torch.randn(1000, 256))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16)
        torch.set_num_threads(3)
        three = kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])
    assert one[2:] == pytest.approx(three[2:], rel=1e-9)


def test_torch_single_threaded_keeps_the_kernels_threads(monkeypatch):
    """The streamed weight path runs torch on one thread; the kernels still split rows across the threads torch
    had (and the row split is what the thread count changes: the bytes are the same)."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        calls = []
        monkeypatch.setattr(kernels, "MIN_ROWS_PER_TASK", 1)
        with kernels.torch_single_threaded():
            assert torch.get_num_threads() == 1 and kernels.threads() == 3
            kernels.parallel_rows(30, lambda r0, r1: calls.append((r0, r1)))
        assert sorted(calls) == [(0, 10), (10, 20), (20, 30)]
        assert torch.get_num_threads() == 3 and kernels.threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_switched_off_and_unbuildable(monkeypatch, tmp_path, torch_path):
    assert kernels.library() is None
    assert kernels.int4_quantize(torch.zeros(2, 128), 128, None) is None
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SLIM_CACHE_DIR", str(tmp_path / "cache"))
    kernels._load.cache_clear()
    try:
        kernels.configure(None)
        assert kernels.library() is None  # null: the torch path
        with pytest.raises(SlimError, match=r"hardware.cpu_kernels=true .*set hardware.cpu_kernels=null"):
            kernels.configure(True)
    finally:
        kernels._load.cache_clear()


def _private_cache(monkeypatch, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("SLIM_CACHE_DIR", str(cache))
    return cache


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_built_once_per_cache(monkeypatch, tmp_path):
    cache = _private_cache(monkeypatch, tmp_path)
    first = kernels._build()
    stamp = first.stat().st_mtime_ns
    assert kernels._build() == first and first.stat().st_mtime_ns == stamp
    (record,) = (cache / "kernels").glob("*.json")
    assert sorted(p.name for p in (cache / "kernels").iterdir()) == sorted([first.name, record.name])  # no temporaries
    recorded = json.loads(record.read_text())
    assert recorded["library"] == first.name
    assert recorded["library_sha256"] == hashlib.sha256(first.read_bytes()).hexdigest()
    assert recorded["source_sha256"] == hashlib.sha256(build.SOURCE.read_bytes()).hexdigest()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("tamper", ["library", "record_source", "record_missing", "symlink"])
def test_a_cached_library_that_does_not_match_its_record_is_rebuilt(monkeypatch, tmp_path, caplog, tamper):
    """Someone's code in place of the built library (or a record that no longer vouches for it) is never loaded:
    the library is rebuilt, and the rebuilt file is the one loaded."""
    cache = _private_cache(monkeypatch, tmp_path)
    lib = kernels._build()
    good = lib.read_bytes()
    record = next((cache / "kernels").glob("*.json"))
    if tamper == "library":
        lib.write_bytes(good[:-64] + b"\0" * 64)  # same size, other bytes
    elif tamper == "record_source":
        record.write_text(json.dumps(json.loads(record.read_text()) | {"source_sha256": "0" * 64}))
    elif tamper == "record_missing":
        record.unlink()
    else:
        elsewhere = tmp_path / "other.so"
        elsewhere.write_bytes(good[:-64] + b"\0" * 64)
        lib.unlink()
        lib.symlink_to(elsewhere)
    assert build.verified(cache / "kernels", *build._key(build.compiler()))[0] is None
    with caplog.at_level("WARNING", logger="slim.kernels"):
        again = kernels._build()
    assert not again.is_symlink() and hashlib.sha256(again.read_bytes()).hexdigest() == \
        json.loads(record.read_text())["library_sha256"]
    assert build.verified(cache / "kernels", *build._key(build.compiler()))[0] == again
    assert "not trusted" in caplog.text and "rebuilding" in caplog.text


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
@pytest.mark.parametrize("which", ["root", "kernels"])
def test_a_cache_directory_others_can_write_is_refused_naming_chmod(monkeypatch, tmp_path, which):
    cache = _private_cache(monkeypatch, tmp_path)
    kernels._build()
    shared = cache if which == "root" else cache / "kernels"
    shared.chmod(0o777)
    with pytest.raises(build.UntrustedCache, match=rf"{shared} is writable by group or others.*chmod go-w {shared}"):
        kernels._build()
    kernels._load.cache_clear()
    try:
        kernels.configure(None)
        assert kernels.library() is None  # null: the torch path, with the reason in the log
        with pytest.raises(SlimError, match=rf"chmod go-w {shared}"):
            kernels.configure(True)  # true: the error names the fix
    finally:
        kernels._load.cache_clear()
        kernels.configure(None)
    shared.chmod(0o755)  # the fix: writable by its owner only
    assert kernels._build().is_file()


@pytest.mark.skipif(not HAS_CC, reason="needs a C compiler")
def test_a_cache_slim_creates_is_private_whatever_the_umask(monkeypatch, tmp_path):
    monkeypatch.setenv("SLIM_CACHE_DIR", str(tmp_path / "new" / "cache"))
    before = os.umask(0o002)  # group-writable by default, as on some shared machines
    try:
        assert kernels._build().is_file()
    finally:
        os.umask(before)
    for d in (tmp_path / "new" / "cache", tmp_path / "new" / "cache" / "kernels"):
        assert d.stat().st_mode & 0o077 == 0, oct(d.stat().st_mode)


@pytest.mark.parametrize("threads", [1, 3])
def test_submitted_fp8_to_int4_gives_the_synchronous_bytes(threads):
    """Queued for the library's worker threads, several in flight at once, each split into ``threads`` row ranges:
    every result is the synchronous call's (codes, scales, packed words and the sums in the same order)."""
    torch.manual_seed(5)
    inputs = [quantize_fp8_block(torch.randn(300, 512) * 0.05), quantize_fp8_block(torch.randn(300, 512))]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        want = [kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16, pack=True)
                for q, s in inputs]
        pending = [kernels.fp8_block_int4_submit(*inputs[i % 2], (128, 128), torch.bfloat16, 128, torch.bfloat16,
                                                 pack=True) for i in range(6)]
    finally:
        torch.set_num_threads(before)
    q, s = inputs[0]
    for i, result in enumerate(pending):
        got, ref = result(), want[i % 2]
        assert torch.equal(got[0], ref[0]) and torch.equal(bits(got[1]), bits(ref[1])) and torch.equal(got[5], ref[5])
        assert got[2:5] == ref[2:5]
    assert kernels.fp8_block_int4_submit(q, s, (128, 128), torch.bfloat16, 96, torch.bfloat16) is None  # 512 % 96


def test_a_queued_call_dropped_unasked_waits_for_its_tasks():
    """An error between queuing and asking drops the result: its tasks must be done before the memory they read
    and write can go (else a worker would write into freed tensors)."""
    torch.manual_seed(9)
    q, s = quantize_fp8_block(torch.randn(2048, 4096))
    pending = [kernels.fp8_block_int4_submit(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16) for _ in range(4)]
    tasks = [t for p in pending for t in p.tasks]
    assert not all(t.done for t in tasks)  # 32 M weights queued: not all done yet
    del pending
    assert all(t.done for t in tasks)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_worker_threads_start_again_in_a_forked_child():
    """A child forked after the workers started (torchrun, data loaders) has none: it starts its own, and its
    queued call completes."""
    import os

    torch.manual_seed(8)
    q, s = quantize_fp8_block(torch.randn(128, 256))
    want = kernels.fp8_block_int4_submit(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16)()
    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if its call completes with the parent's bytes
        ok = False
        try:
            got = kernels.fp8_block_int4_submit(q, s, (128, 128), torch.bfloat16, 128, torch.bfloat16)()
            ok = torch.equal(got[0], want[0]) and got[2:] == want[2:]
        finally:
            os._exit(0 if ok else 1)
    deadline = __import__("time").monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and __import__("time").monotonic() < deadline:
        __import__("time").sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's queued call never completed")
    assert os.waitstatus_to_exitcode(done[1]) == 0


@pytest.mark.parametrize("shape,group", [((300, 512), 128), ((129, 384), 64), ((64, 512), 256), ((5, 96), 32)])
def test_fp8_to_int4_packs_as_the_pack_kernel_and_compressed_tensors(shape, group):
    """``pack=True``: the words packed in the quantizing pass are pack_int4's (and compressed-tensors') words of
    the codes it returns, whatever the group and block layout; a group that is not whole words is refused."""
    torch.manual_seed(6)
    q, s = quantize_fp8_block(torch.randn(shape) * 0.05)
    codes, scale, signal, noise, nonfinite, packed = kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, group,
                                                                            torch.bfloat16, pack=True)
    plain = kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, group, torch.bfloat16)
    assert torch.equal(codes, plain[0]) and torch.equal(bits(scale), bits(plain[1])) and plain[2:] == (signal, noise, 0)
    assert torch.equal(packed, kernels.pack_int4(codes)[0]) and torch.equal(packed, pack_to_int32(codes, 4))
    assert kernels.fp8_block_int4(q[:, :36], s[:, :1], (128, 128), torch.bfloat16, 12, torch.bfloat16,
                                  pack=True) is None


@pytest.mark.parametrize("lookup", [False, True])
@pytest.mark.parametrize("shape,group", [((300, 512), 128), ((129, 384), 64), ((5, 96), 32)])
def test_fp8_to_int4_without_codes_gives_the_same_words_scales_and_sums(shape, group, lookup):
    """``codes=False`` (the streamed path, which writes only the packed words): the int8 codes are not stored, the
    first item is a meta tensor of their shape, and words, scales and sums are those of the call that stores them;
    queued the same. Both ways through the kernel (lookup tables where compiled in, and the plain way); with
    adversarial input, so groups leave the lookup path too. Without ``pack`` nothing would be stored: refused."""
    if lookup and not kernels.lookup_tables():
        pytest.skip("the lookup-table path needs x86 AVX-512 VBMI")
    q, s = adversarial_fp8(*shape, seed=7 + group)
    args = (q, s, (128, 128), torch.bfloat16, group, torch.bfloat16)
    with lookup_switched(lookup):
        want = kernels.fp8_block_int4(*args, pack=True)
        got = [kernels.fp8_block_int4(*args, pack=True, codes=False),
               kernels.fp8_block_int4_submit(*args, pack=True, codes=False)()]
    assert want[4] > 0  # the NaN codes reached the kernel
    for g in got:
        assert g[0].is_meta and g[0].shape == want[0].shape and g[0].dtype == torch.int8
        assert torch.equal(bits(g[1]), bits(want[1])) and torch.equal(g[5], want[5])
        assert g[2:5] == pytest.approx(want[2:5], rel=0, nan_ok=True)
    with pytest.raises(ValueError, match="codes=False needs pack=True"):
        kernels.fp8_block_int4(*args, codes=False)


def adversarial_fp8(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 codes and scales that reach every case of the lookup-table path and its way out: realistic
    weights, all 256 codes, groups of zeros, NaN codes in some groups; block scales negative, zero, subnormal
    (group scales that round to 0 in bf16), huge (decoded absmax overflows), infinite and NaN."""
    torch.manual_seed(seed)
    q, s = quantize_fp8_block(torch.randn(rows, cols) * 0.05)
    u = q.view(torch.uint8)
    u[1::7] = torch.randint(0, 256, u[1::7].shape, dtype=torch.uint8)  # every code, both signs
    u[2, :64] = 0
    u[3, 5], u[min(rows - 1, 130), cols - 1] = 0x7F, 0xFF  # NaN codes
    specials = [-0.013, 0.0, 2.0**-140, 2.0**-126 / 3, 1e36, float("inf"), float("nan"), -2.0**-135]
    flat = s.view(-1)
    for i, v in enumerate(specials):
        flat[(3 * i + 1) % flat.numel()] = v
    return q, s


@pytest.mark.skipif(not kernels.lookup_tables(), reason="the lookup-table path needs x86 AVX-512 VBMI")
@pytest.mark.parametrize("shape,group", [((384, 1024), 128), ((300, 640), 64), ((129, 384), 32), ((200, 512), 256)])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float32])
def test_fp8_to_int4_lookup_tables_give_the_plain_paths_bytes(shape, group, scale_dtype):
    """The lookup-table path (on by default where compiled in) against the plain one on adversarial input: the same
    codes, scales, packed words and non-finite count, and the same sums up to their order of addition."""
    q, s = adversarial_fp8(*shape, seed=sum(shape) + group)
    args = (q, s, (128, 128), torch.bfloat16, group, scale_dtype)
    with lookup_switched(False) as state:
        assert state is False
        plain = kernels.fp8_block_int4(*args, pack=True)
    assert kernels.lookup_tables() is True
    got = kernels.fp8_block_int4(*args, pack=True)
    assert plain[4] > 0  # the NaN codes and non-finite scales did reach the kernel
    for a, b in zip((got[0], got[1], got[5]), (plain[0], plain[1], plain[5])):
        assert torch.equal(bits(a), bits(b))
    assert got[4] == plain[4]
    assert got[2:4] == pytest.approx(plain[2:4], rel=1e-12, nan_ok=True)


@pytest.mark.skipif(not kernels.lookup_tables(), reason="the lookup-table path needs x86 AVX-512 VBMI")
@pytest.mark.parametrize("shape", [(384, 1024), (300, 650), (129, 37), (5, 96)])
@pytest.mark.parametrize("threads", [1, 3])
def test_decode_lookup_tables_give_the_plain_paths_bytes(shape, threads):
    """FP8 -> bf16 by lookup tables (on by default where compiled in) against the plain way on adversarial input:
    every code, NaN codes, block scales negative, zero, subnormal, overflowing, infinite and NaN, ragged block
    columns (stretches short of 32 codes), row ranges split across threads off the 128-row blocks."""
    q, s = adversarial_fp8(*shape, seed=sum(shape))
    args = (q, s, (128, 128), torch.bfloat16)
    with torch_threads(threads):
        with lookup_switched(False) as state:
            assert state is False
            plain, plain_bad = kernels.fp8_block_decode(*args)
        assert kernels.lookup_tables() is True
        got, bad = kernels.fp8_block_decode(*args)
    assert plain_bad > 0  # the NaN codes and non-finite scales did reach the kernel
    assert torch.equal(bits(got), bits(plain)) and bad == plain_bad
    assert torch.equal(bits(got), bits(off(dequantize_fp8_block, q, s, dtype=torch.bfloat16)))


@pytest.mark.skipif(not kernels.lookup_tables(), reason="the lookup-table path needs x86 AVX-512 VBMI")
@pytest.mark.parametrize("negative", [False, True])
def test_fp8_to_int4_lookup_tables_match_the_torch_path(negative):
    """Finite input through the lookup tables (negative block scales included) against materializing the weight
    in bf16 and quantizing it with the scheme: codes and scales bit for bit, the sums to 1e-6."""
    torch.manual_seed(7)
    q, s = quantize_fp8_block(torch.randn(384, 512) * 0.02)
    q.view(torch.uint8)[::5] = torch.randint(0, 256, q[::5].shape, dtype=torch.uint8) & 0x7E  # no NaN code
    if negative:
        s = -s
    weight = off(dequantize_fp8_block, q, s, dtype=torch.bfloat16)
    ref = off(SCHEMES["w4a8_dynamic"].quantize, weight.float(), None, 128, "minmax", torch.bfloat16)
    codes, scale, signal, noise, nonfinite = kernels.fp8_block_int4(q, s, (128, 128), torch.bfloat16, 128,
                                                                    torch.bfloat16)
    assert torch.equal(codes, ref.weight) and torch.equal(bits(scale), bits(ref.weight_scale)) and nonfinite == 0
    w = weight.double()
    assert signal == pytest.approx(float((w * w).sum()), rel=1e-6)
    err = codes.double() * scale.double().repeat_interleave(128, 1) - w
    assert noise == pytest.approx(float((err * err).sum()), rel=1e-6)
