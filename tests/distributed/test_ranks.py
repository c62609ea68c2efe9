"""Two gloo ranks through the real CLI: a log file per rank whose every line names the rank, and rank 0's work before
a barrier (model.convert_from) that outlasts the collective timeout, or fails, without timing out or hanging the
other rank (slim.ranks)."""

import os
import re
import textwrap
import time

import pytest

from tests.helpers.cli import slim_main

QUICK = ["hardware=cpu_x2", "eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64"]

# rank 0's source preparation (where model.convert_from converts) sleeps or raises first
SITE = textwrap.dedent('''
    import os
    action = os.environ.get("SLIM_TEST_RANK0_PREPARE")
    if action and os.environ.get("RANK") == "0":
        import time
        import slim.models.convert as c
        original = c.prepare_source
        def prepare_source(*args, **kwargs):
            if action == "fail":
                raise RuntimeError("injected conversion failure on rank 0")
            time.sleep(float(action))
            return original(*args, **kwargs)
        c.prepare_source = prepare_source
''')


def rank0_env(tmp_path, action):
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITE)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
            "SLIM_TEST_RANK0_PREPARE": action}


@pytest.mark.slow
def test_each_rank_has_its_own_log_file_and_every_line_names_its_rank(tmp_path):
    run = tmp_path / "run"
    proc = slim_main(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank1 = (run / "main.rank1.log").read_text().splitlines()
    assert len(rank1) > 10 and all(line.startswith("[rank 1/2] ") for line in rank1), rank1[:5]
    assert any("quantize layers" in line or "decoder layers" in line for line in rank1)
    rank0 = [line for line in (run / "main.log").read_text().splitlines() if line.startswith("[rank ")]
    assert rank0 and all(line.startswith("[rank 0/2] ") for line in rank0)  # main.log: rank 0 (and the launcher)
    assert not (run / "main.rank0.log").exists()
    assert sorted(p.name for p in run.glob("main*.log")) == ["main.log", "main.rank1.log"]
    # the console carries the prefix too: both ranks' lines can be told apart in torchrun's merged output
    console = proc.stdout + proc.stderr
    assert re.search(r"^\[rank 1/2\] \[", console, re.M) and re.search(r"^\[rank 0/2\] \[", console, re.M)


@pytest.mark.slow
def test_rank0_work_longer_than_the_collective_timeout_does_not_time_out_the_others(tmp_path):
    run = tmp_path / "run"
    # rank 0 prepares the source for 30 s; a collective would time out after 8 s
    proc = slim_main(*QUICK, "hardware.timeout_s=8", f"hydra.run.dir={run}", cwd=tmp_path,
                     env=rank0_env(tmp_path, "30"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run / "checkpoint" / "config.json").is_file()
    rank1 = (run / "main.rank1.log").read_text()
    assert "waiting for rank 0: preparing the source checkpoint" in rank1
    assert not (run / ".slim_rank0").exists()  # the status file is gone


@pytest.mark.slow
def test_rank0_failing_before_the_barrier_is_reported_on_every_rank_at_once(tmp_path):
    run = tmp_path / "run"
    start = time.monotonic()
    proc = slim_main(*QUICK, "hardware.timeout_s=300", f"hydra.run.dir={run}", cwd=tmp_path,
                     env=rank0_env(tmp_path, "fail"))
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 120, elapsed  # not a wait for the 300 s collective timeout
    rank1 = (run / "main.rank1.log").read_text()
    assert "[rank 1/2] " in rank1 and "rank 0 failed while preparing the source checkpoint" in rank1
    assert "injected conversion failure on rank 0" in rank1  # rank 0's own error, on rank 1
