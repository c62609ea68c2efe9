"""Two gloo ranks on the CPU (hardware=cpu_x2) against one process (hardware=cpu), through the real CLI."""

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from slim.quant.fp8 import FP8_DTYPE
from tests.helpers.cli import sitecustomize_env


def slim_main(*args, cwd, env=None, timeout=600):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def tensors(ckpt):
    out = {}
    for shard in sorted(set(json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(ckpt / shard, framework="pt") as f:
            for k in f.keys():
                t = f.get_tensor(k)
                out[k] = t.view(torch.uint8) if t.dtype == FP8_DTYPE else t
    return out


COMMON = ["eval=none", "logger=none", "calibration.num_samples=8", "calibration.seq_len=128"]


@pytest.mark.slow
@pytest.mark.parametrize("scheme,overrides", [
    ("fp8_static", COMMON), ("w4a8", COMMON),
    ("w4a8", COMMON + ["scheme.format=w4afp8"]),  # layer-max input scales: the same whatever the ranks saw
    ("w4a8_dynamic", ["eval=none", "logger=none", "calibration=none"]),  # calibration off: weights only
])
def test_two_ranks_bit_identical_to_one(tmp_path, scheme, overrides):
    runs = {}
    for hw in ("cpu", "cpu_x2"):
        run_dir = tmp_path / hw
        proc = slim_main(f"hardware={hw}", f"scheme={scheme}", *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[hw] = run_dir / "checkpoint"
    one, two = tensors(runs["cpu"]), tensors(runs["cpu_x2"])
    assert one.keys() == two.keys()
    for name in one:
        assert one[name].dtype == two[name].dtype and torch.equal(one[name], two[name]), name
    shards = set(json.loads((runs["cpu_x2"] / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert len(shards) >= 2  # each rank wrote its own shard(s)
    cfg1 = json.loads((runs["cpu"] / "config.json").read_text())
    cfg2 = json.loads((runs["cpu_x2"] / "config.json").read_text())
    assert cfg1["quantization_config"] == cfg2["quantization_config"]
    assert cfg1["slim"]["calibration"] == cfg2["slim"]["calibration"]


def _inject(tmp_path, body):
    """A sitecustomize that breaks rank 1 only (imported by every rank's interpreter at start-up)."""
    return sitecustomize_env(tmp_path,
                             "import os\n"
                             "if os.environ.get('RANK') == '1':\n"
                             "    import slim.quantize as q\n"
                             "    def broken(*args, **kwargs):\n"
                             f"        {body}\n"
                             "    q.LayerQuantizer.quantize = broken\n")


def failed_ranks(err: str) -> dict[int, int]:
    """The ranks torchrun (which ``slim.launch`` starts) lists as failed, with their exit codes: its summary writes
    ``rank      : 1 (local_rank: 1)`` then ``exitcode  : 1 (pid: ...)`` per rank (torch ChildFailedError,
    torch/distributed/elastic/multiprocessing/errors/__init__.py); a rank it stopped shows -15 (SIGTERM)."""
    return {int(rank): int(code) for rank, code in
            re.findall(r"rank\s+: (\d+) \(local_rank: \d+\)\n\s+exitcode\s+: (-?\d+)", err)}


@pytest.mark.slow
def test_a_failing_rank_fails_the_job_naming_it(tmp_path):
    env = _inject(tmp_path, "raise RuntimeError('injected failure')")  # the fault's text names no rank
    start = time.monotonic()
    proc = slim_main("hardware=cpu_x2", *COMMON, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 240
    err = proc.stderr + proc.stdout
    assert "RuntimeError: injected failure" in err
    failed = failed_ranks(err)
    assert failed.get(1) == 1, err[-3000:]  # rank 1 is named, with the exit code of its exception
    assert all(code != 1 for rank, code in failed.items() if rank != 1), failed  # no other rank raised it
    assert not (tmp_path / "run" / "checkpoint" / "config.json").exists()


@pytest.mark.slow
def test_a_hanging_rank_fails_the_job_in_bounded_time(tmp_path):
    env = _inject(tmp_path, "import time; time.sleep(3600)")
    start = time.monotonic()
    proc = slim_main("hardware=cpu_x2", "hardware.timeout_s=20", *COMMON, f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode != 0
    assert time.monotonic() - start < 240
    err = proc.stderr + proc.stdout
    # slim.distributed: "rank <r>: <collective> failed (<why>); unresponsive: <torch's monitored barrier>", which names
    # the ranks that did not answer: "[Rank 0]: Ranks 1 failed to pass monitoredBarrier" (gloo, wait_all_ranks)
    assert re.search(r"rank 0: \w+ failed \(.*\); "  # whichever collective waits first
                     r"unresponsive: \[Rank 0\]: Ranks 1 failed to pass monitoredBarrier", err), err[-3000:]
    assert not (tmp_path / "run" / "checkpoint" / "config.json").exists()


@pytest.mark.slow
def test_a_rank_failing_mid_export_then_rerun_resumes_to_the_same_tensors(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1' and os.environ.get('SLIM_TEST_BREAK'):\n"
        "    import slim.resume as r\n"
        "    original, calls = r.ResumeStore.save_layer, [0]\n"
        "    def save_layer(self, *args, **kwargs):\n"
        "        calls[0] += 1\n"
        "        if calls[0] == 3:\n"
        "            raise RuntimeError('injected failure on rank 1 after two commits')\n"
        "        return original(self, *args, **kwargs)\n"
        "    r.ResumeStore.save_layer = save_layer\n"
    )
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run = tmp_path / "run"
    failed = slim_main("hardware=cpu_x2", *COMMON, f"hydra.run.dir={run}", cwd=tmp_path,
                       env={**env, "SLIM_TEST_BREAK": "1"}, timeout=300)
    assert failed.returncode != 0 and "injected failure on rank 1" in failed.stderr + failed.stdout
    assert json.loads((run / "checkpoint" / ".slim_resume" / "commit.json").read_text())["layer"] == 1
    resumed = slim_main("hardware=cpu_x2", *COMMON, f"hydra.run.dir={run}", cwd=tmp_path, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming after layer 1" in resumed.stderr + resumed.stdout
    single = slim_main("hardware=cpu", *COMMON, f"hydra.run.dir={tmp_path / 'cpu'}", cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-4000:]
    one, two = tensors(tmp_path / "cpu" / "checkpoint"), tensors(run / "checkpoint")
    assert one.keys() == two.keys()
    assert all(torch.equal(one[n], two[n]) for n in one), [n for n in one if not torch.equal(one[n], two[n])]
