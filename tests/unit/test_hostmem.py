"""The host allocator policy: ~1 MB temporaries reuse heap pages instead of faulting in fresh ones."""

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
    assert after < 50 * 10


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    from slim.hostmem import keep_temporaries_in_heap

    monkeypatch.setenv("SLIM_MALLOPT", "0")
    assert keep_temporaries_in_heap() is False
