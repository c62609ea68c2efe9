"""mode=plan sizes the evaluation and names the vLLM serving layout, from the shipped R1 config.json."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs the CLI


def plan(tmp_path, *args):
    run_dir = tmp_path / "plan"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "DEEPSEEK_R1_PATH": str(tmp_path / "not_downloaded")}
    proc = subprocess.run([sys.executable, "-m", "slim.main", "mode=plan", "logger=none", f"hydra.run.dir={run_dir}",
                           *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    return proc, (json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else None)


def test_r1_w4a8_on_one_lowmem_h20_plans_a_feasible_streamed_evaluation(tmp_path):
    proc, res = plan(tmp_path, "model=deepseek_r1", "hardware=h20x1_lowmem", "scheme=w4a8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "planning with the shipped" in proc.stdout and res["plan"]["config"].endswith("configs/deepseek_r1")
    ev = res["eval_plan"]
    assert ev["backend"] == "streamed" and ev["feasible"]
    assert ev["bytes"]["largest decoder layer (compute dtype)"] > 20 * 2**30  # an R1 MoE layer in bf16
    assert res["vllm_layouts"] == [] and "SGLang" in proc.stdout  # static W4A8 has no vLLM scheme


def test_r1_w4a8_dynamic_on_h20x16_names_the_layout_vllm_accepts(tmp_path):
    proc, res = plan(tmp_path, "model=deepseek_r1", "hardware=h20x16", "scheme=w4a8_dynamic", "calibration=none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert res["vllm_refused_tensor_parallel"] == [16]  # 2048 / 16 = 128, not a multiple of 256
    assert res["vllm_layouts"][0].startswith("--tensor-parallel-size 8 --pipeline-parallel-size 2")


def test_hf_backend_on_r1_is_not_feasible(tmp_path):
    proc, res = plan(tmp_path, "model=deepseek_r1", "hardware=h20x8", "scheme=fp8_static", "eval.backend=hf")
    assert proc.returncode == 2
    assert "eval.backend=streamed" in proc.stderr and not res["eval_plan"]["feasible"]


def test_r1_presets_default_to_the_streamed_backend():
    from tests.conftest import compose_config

    for model in ("deepseek_r1", "deepseek_r1_bf16"):
        assert compose_config(f"model={model}").eval.backend == "streamed"
        assert compose_config(f"model={model}", "eval=standard").eval.backend == "streamed"
    assert compose_config().eval.backend == "hf"
    assert compose_config("model=deepseek_r1", "eval.backend=hf").eval.backend == "hf"
