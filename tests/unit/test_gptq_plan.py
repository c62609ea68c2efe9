"""mode=plan with algorithm=gptq: the Hessians of the worst layer and the expert chunk that fits, for R1 (no weights)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from slim.config import ASSETS
from slim.models.adapters import build_skeleton, load_config
from slim.plan import GiB, plan_memory
from slim.targets import select_targets
from tests.helpers.configs import compose_config

R1 = ASSETS / "configs" / "deepseek_r1"
HESSIANS = "GPTQ Hessians (one layer; routed experts one chunk)"
PER_EXPERT = (7168 * 7168 + 2048 * 2048) * 4  # gate/up share one H, down its own


@pytest.fixture(scope="module")
def r1_skeleton():
    return build_skeleton(load_config(str(R1)), torch.bfloat16)  # meta device: no memory


def r1_plan(r1_skeleton, *overrides):
    model, adapter = r1_skeleton
    cfg = compose_config("model=deepseek_r1", f"model.path={R1}", "calibration=jsonl", "calibration.path=x",
                         "algorithm=gptq", *overrides)
    return plan_memory(cfg, model, adapter, select_targets(model, cfg.scheme.ignore_layers).ignored)


@pytest.mark.parametrize("hardware", ["h20x1_lowmem", "h20x8", "h20x16"])
def test_r1_w4a8_gptq_is_feasible_with_every_experts_hessian(r1_skeleton, hardware):
    plan = r1_plan(r1_skeleton, f"hardware={hardware}", "scheme=w4a8")
    assert plan.feasible, plan.table()
    # R1's 256 routed experts of one layer need ~53 GiB of Hessians: all at once where they fit (141 GB H20s), in
    # two calibration passes on one 96 GB H20 beside the layer and the calibration hidden states
    assert plan.device_bytes[HESSIANS] == plan.expert_chunk * PER_EXPERT
    assert plan.calibration_passes == -(-256 // plan.expert_chunk)
    assert plan.expert_chunk == {"h20x1_lowmem": 242, "h20x8": 256, "h20x16": 256}[hardware]
    assert plan.device_total <= 0.95 * plan.device_capacity
    # ranks add their Hessians from an all-gather, one H at a time: world copies of the largest (gate/up's)
    gather = plan.device_bytes.get("GPTQ Hessian all-gather (ranks x the largest H)", 0)
    assert gather == {"h20x1_lowmem": 0, "h20x8": 8, "h20x16": 16}[hardware] * 7168 * 7168 * 4
    experts = 256 * 3 * 2048 * 7168  # the codes of one layer's routed experts wait on the host, a byte per weight
    assert plan.host_bytes["GPTQ results (codes and scales of one layer)"] == experts + experts // 128 * 4


def test_a_smaller_device_collects_experts_in_chunks(r1_skeleton):
    plan = r1_plan(r1_skeleton, "hardware=h20x1_lowmem", "scheme=w4a8", "hardware.device_memory_gb=48")
    assert plan.feasible, plan.table()
    assert 1 <= plan.expert_chunk < 256 and plan.calibration_passes == -(-256 // plan.expert_chunk)
    assert plan.device_bytes[HESSIANS] == plan.expert_chunk * PER_EXPERT
    assert plan.device_total <= 0.95 * 48 * GiB
    assert f"{plan.expert_chunk} experts per pass" in plan.table()
    # float64 Hessians: twice the bytes per expert, so fewer experts per pass
    wide = r1_plan(r1_skeleton, "hardware=h20x1_lowmem", "scheme=w4a8", "hardware.device_memory_gb=48",
                   "algorithm.hessian_dtype=float64")
    assert wide.device_bytes[HESSIANS] == wide.expert_chunk * 2 * PER_EXPERT and wide.expert_chunk < plan.expert_chunk
    # a chunk the user sets is what the plan counts
    fixed = r1_plan(r1_skeleton, "hardware=h20x8", "scheme=w4a8", "algorithm.expert_chunk=32")
    assert fixed.expert_chunk == 32 and fixed.calibration_passes == 8 and fixed.device_bytes[HESSIANS] == 32 * PER_EXPERT


def test_no_room_for_one_expert_is_refused_with_the_fix(r1_skeleton):
    plan = r1_plan(r1_skeleton, "hardware=h20x1_lowmem", "scheme=w4a8", "hardware.device_memory_gb=26")
    assert not plan.feasible and any("algorithm=rtn" in p for p in plan.problems), plan.problems


def test_awq_gptq_plans_the_same_hessians_as_gptq(r1_skeleton):
    gptq = r1_plan(r1_skeleton, "hardware=h20x8", "scheme=w4a8")
    both = r1_plan(r1_skeleton, "hardware=h20x8", "scheme=w4a8", "algorithm=awq_gptq")
    assert both.device_bytes[HESSIANS] == gptq.device_bytes[HESSIANS] > 0 and both.expert_chunk == gptq.expert_chunk


def test_rtn_and_fp8_weights_plan_no_hessians(r1_skeleton):
    for overrides in (("algorithm=rtn", "scheme=w4a8"), ("scheme=fp8_static",)):
        plan = r1_plan(r1_skeleton, "hardware=h20x8", *overrides)
        assert HESSIANS not in plan.device_bytes and plan.calibration_passes == 1
    plan = r1_plan(r1_skeleton, "hardware=h20x8", "scheme=fp8_static", "algorithm.fp8_weights=true")
    assert plan.device_bytes[HESSIANS] > 0  # every Linear but lm_head: attention and dense MLPs too


@pytest.mark.slow
@pytest.mark.parametrize("hardware", ["h20x1_lowmem", "h20x8"])
def test_cli_plan_r1_gptq_feasible(tmp_path, hardware):
    run_dir = tmp_path / "plan"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DEEPSEEK_R1_PATH": str(tmp_path / "not_downloaded")}
    proc = subprocess.run([sys.executable, "-m", "slim.main", "mode=plan", "model=deepseek_r1", "algorithm=gptq",
                           "scheme=w4a8", f"hardware={hardware}", "logger=none", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["plan"]["feasible"] and res["plan"]["expert_chunk"] > 128
    assert res["plan"]["device_bytes"][HESSIANS] == res["plan"]["expert_chunk"] * PER_EXPERT
    assert "GPTQ Hessians" in proc.stdout


@pytest.mark.slow
def test_cli_sweeps_rtn_and_gptq(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-m", "slim.main", "-m", "algorithm=rtn,gptq", "mode=plan", "scheme=w4a8",
                           "logger=none", f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plans = {p.parent.name.split(",")[0]: json.loads(p.read_text())["plan"]
             for p in (tmp_path / "sweep").glob("*/results.json")}
    assert sorted(plans) == ["0_algorithm=rtn", "1_algorithm=gptq"]
    assert HESSIANS in plans["1_algorithm=gptq"]["host_bytes"] and HESSIANS not in plans["0_algorithm=rtn"]["host_bytes"]
