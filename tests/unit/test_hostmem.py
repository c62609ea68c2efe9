"""The host allocator policy: ~1 MB temporaries reuse heap pages instead of faulting in fresh ones."""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import ctypes, ctypes.util, resource, sys
    import torch
    from slim.hostmem import M_MMAP_THRESHOLD, keep_temporaries_in_heap

    def faults_of_temporaries():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            torch.ones(1 << 18).add_(1)  # 1 MiB float32, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 << 10)  # glibc's default, frozen
    print(faults_of_temporaries(), keep_temporaries_in_heap(), faults_of_temporaries())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_temporaries_stop_faulting_in_fresh_pages():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, applied, after = int(out[0]), out[1], int(out[2])
    assert applied == "True"
    assert before >= 50 * 200  # each 1 MiB temporary was 256 fresh pages
    assert after * 10 < before  # the heap pages are reused: the first temporary faults them in, the rest do not


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    from slim.hostmem import _libc, keep_temporaries_in_heap

    monkeypatch.setenv("SLIM_MALLOPT", "0")
    _libc.cache_clear()  # the lookup is cached per process; read the variable again
    try:
        assert keep_temporaries_in_heap() is False
    finally:
        monkeypatch.delenv("SLIM_MALLOPT")
        _libc.cache_clear()


TRIM_SCRIPT = textwrap.dedent("""
    import psutil, torch
    from slim.hostmem import keep_temporaries_in_heap, release_free_heap

    keep_temporaries_in_heap()
    rss = lambda: psutil.Process().memory_info().rss >> 20
    blocks = [torch.ones(1 << 18) for _ in range(300)]  # 300 MiB of 1 MiB heap chunks
    kept = blocks[::10]  # live chunks all over the heap: free() alone cannot shrink it
    del blocks
    before = rss()
    release_free_heap()
    print(before, rss())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_pages_go_back_after_a_layer():
    out = subprocess.run([sys.executable, "-c", TRIM_SCRIPT], capture_output=True, text=True, check=True).stdout.split()
    before, after = int(out[0]), int(out[1])
    assert before - after > 200  # the 270 MiB freed between the live chunks are returned


def test_gemm_kernel_caches_off_unless_the_user_set_them(monkeypatch):
    from slim.hostmem import IDEEP_CACHE, ONEDNN_CACHE, no_gemm_kernel_cache

    monkeypatch.delenv(ONEDNN_CACHE, raising=False)
    monkeypatch.delenv(IDEEP_CACHE, raising=False)
    no_gemm_kernel_cache()
    assert os.environ[ONEDNN_CACHE] == "0" and os.environ[IDEEP_CACHE] == "1"
    monkeypatch.setenv(ONEDNN_CACHE, "256")
    monkeypatch.setenv(IDEEP_CACHE, "64")
    no_gemm_kernel_cache()
    assert os.environ[ONEDNN_CACHE] == "256" and os.environ[IDEEP_CACHE] == "64"


SHAPES_SCRIPT = textwrap.dedent("""
    import sys, torch
    from slim.hostmem import no_gemm_kernel_cache
    if sys.argv[1] == "slim":
        no_gemm_kernel_cache()
    torch.set_num_threads(1)

    def anon_mib():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("RssAnon")) / 1024

    w, x = torch.randn(512, 1024, dtype=torch.bfloat16), torch.randn(200, 1024, dtype=torch.bfloat16)
    torch.nn.functional.linear(x[:1], w)
    before = anon_mib()
    for m in range(1, 201):  # as calibrated routed experts: every matmul a new token count
        torch.nn.functional.linear(x[:m], w)
    print(anon_mib() - before)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_matmuls_of_ever_new_shapes_do_not_pile_up_cached_kernels():
    from slim.hostmem import IDEEP_CACHE, ONEDNN_CACHE

    def growth(mode):
        env = {k: v for k, v in os.environ.items() if k not in (ONEDNN_CACHE, IDEEP_CACHE)}
        out = subprocess.run([sys.executable, "-c", SHAPES_SCRIPT, mode], capture_output=True, text=True, check=True,
                             env=env | {"OMP_NUM_THREADS": "1"}).stdout
        return float(out)

    default = growth("torch")
    if default < 20:
        pytest.skip(f"this CPU's bf16 matmuls cache little per shape ({default:.1f} MiB for 200 shapes)")
    assert growth("slim") < min(10.0, default / 4), default
