"""algorithm=gptq through the real CLI on the embedded model: closer to bf16 than round to nearest (KL divergence of
the next-token distributions on the shipped held-out text), fallbacks and errors in modules.json, a checkpoint that
verifies, and a resume after kill -9 that gives the same bytes."""

import json
import os
import signal
import subprocess
import sys

import pytest

from slim.config import ASSETS
from tests.cli.test_faults import fault_env, files
from tests.helpers import accuracy
from tests.helpers.cli import slim_main

pytestmark = pytest.mark.slow  # every test runs the CLI

RUNS = {  # name: overrides; W4 on every Linear but lm_head, and on the reference ignore list (routed experts)
    "w4a8_rtn": ["scheme=w4a8"],
    "w4a8_gptq": ["scheme=w4a8", "algorithm=gptq"],
    "w4_all_rtn": ["scheme=w4a8", "scheme.ignore_layers=[lm_head]"],
    "w4_all_gptq": ["scheme=w4a8", "scheme.ignore_layers=[lm_head]", "algorithm=gptq"],
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gptq")
    for name, overrides in RUNS.items():
        proc = slim_main("eval=none", "logger=none", *overrides, f"hydra.run.dir={tmp / name}", cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp


def kl_to_bf16(paths):
    """KL(bf16 || quantized) of next-token distributions, mean over 32 x 256 held-out positions."""
    return accuracy.kl_to_bf16(ASSETS / "tiny_deepseek", paths)


def test_gptq_is_closer_to_bf16_than_rtn(exported):
    kl = kl_to_bf16({name: exported / name / "checkpoint" for name in RUNS})
    print("KL(bf16 || quantized):", kl)
    assert 0 < kl["w4a8_gptq"] < kl["w4a8_rtn"], kl
    assert 0 < kl["w4_all_gptq"] < kl["w4_all_rtn"], kl


def test_modules_record_the_algorithm_and_errors_before_after(exported):
    mods = json.loads((exported / "w4_all_gptq" / "modules.json").read_text())
    assert {m["algorithm"] for m in mods} == {"gptq"}  # enough tokens everywhere with the default min_tokens
    assert all(m["output_rel_err"] is not None and m["rtn_output_rel_err"] is not None for m in mods)
    better = sum(m["output_rel_err"] < m["rtn_output_rel_err"] for m in mods)
    assert better >= 0.9 * len(mods), [m["name"] for m in mods if m["output_rel_err"] >= m["rtn_output_rel_err"]]
    rtn = json.loads((exported / "w4_all_rtn" / "modules.json").read_text())
    assert {m["algorithm"] for m in rtn} == {"rtn"}
    res = json.loads((exported / "w4a8_gptq" / "results.json").read_text())
    assert res["algorithm"] == "gptq"
    cfg = json.loads((exported / "w4a8_gptq" / "checkpoint" / "config.json").read_text())
    assert cfg["slim"]["algorithm"] == "gptq" and cfg["slim"]["algorithm_config"]["block_size"] == 128
    assert cfg["slim"]["algorithm_fallbacks"] == []


def test_min_tokens_falls_back_to_rtn_and_is_recorded(tmp_path):
    # 4 samples x 64 tokens: 256 tokens per layer, top-4 of 16 experts: ~64 per expert, below 1000
    proc = slim_main("eval=none", "logger=none", "scheme=w4a8", "algorithm=gptq", "algorithm.min_tokens=1000",
                     "calibration.num_samples=4", "calibration.seq_len=64", f"hydra.run.dir={tmp_path / 'run'}",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mods = json.loads((tmp_path / "run" / "modules.json").read_text())
    assert mods and all(m["algorithm"] == "rtn-fallback" and "< algorithm.min_tokens 1000" in m["algorithm_note"]
                        for m in mods)
    assert "fell back to rtn" in proc.stderr + proc.stdout


def test_checkpoint_verifies(exported):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "slim.verify", str(exported / "w4_all_gptq" / "checkpoint")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.startswith("ok:"), proc.stdout + proc.stderr


QUICK = ["eval=none", "logger=none", "scheme=w4a8", "algorithm=gptq", "calibration.num_samples=8",
         "calibration.seq_len=64", "export.max_shard_mb=1"]


@pytest.mark.parametrize("point", ["slim.resume:ResumeStore.commit:2", "slim.export:ShardFile.add_pieces:400"])
def test_kill_9_then_rerun_gives_byte_identical_checkpoint(tmp_path, point):
    ref = slim_main(*QUICK, f"hydra.run.dir={tmp_path / 'ref'}", cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    killed = slim_main(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path, env=fault_env(tmp_path, point + ":kill"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    resumed = slim_main(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout + resumed.stderr
    assert files(run / "checkpoint") == files(tmp_path / "ref" / "checkpoint")
