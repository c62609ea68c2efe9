"""eval.backend=streamed through the real CLI: the same scores as the hf backend, and bad eval configs refused
before the quantize stage (exit 2, one line naming the fix)."""

import json
import math
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # every test runs the CLI


def slim_main(*args, cwd, env=None, timeout=900):
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true", **(env or {})}
    if "SLIM_VLLM_PYTHON" not in (env or {}):  # the vLLM environment only where a test sets it
        full_env.pop("SLIM_VLLM_PYTHON", None)
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _eval(tmp_path, name, *args):
    run_dir = tmp_path / name
    proc = slim_main("mode=eval", "logger=none", "eval.limit=6", f"hydra.run.dir={run_dir}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


def _assert_same_scores(hf: dict, streamed: dict) -> None:
    assert set(hf) == set(streamed) == {"slim_text_ppl", "slim_text_mc"}
    for metric in ("word_perplexity", "byte_perplexity"):
        a, b = hf["slim_text_ppl"][metric], streamed["slim_text_ppl"][metric]
        # log(perplexity) is the summed log-likelihood over a fixed count: equal sums within 1e-4 relative
        assert abs(math.log(b) - math.log(a)) <= 1e-4 * abs(math.log(a)), (metric, a, b)
    for metric in ("acc", "acc_norm"):
        assert hf["slim_text_mc"][metric] == streamed["slim_text_mc"][metric]


@pytest.mark.parametrize("scheme,numerics", [(None, "checkpoint"), ("fp8_static", "vllm"), ("w4a8", "checkpoint"),
                                             ("w4a8_dynamic", "vllm")])
def test_streamed_backend_scores_what_hf_scores(tmp_path, scheme, numerics):
    if scheme is None:  # the bf16 source (converted once from the embedded block-FP8 model)
        target = ["model=tiny_deepseek_bf16"]
    else:
        run_dir = tmp_path / "q"
        extra = ["calibration=none"] if scheme == "w4a8_dynamic" else ["calibration.num_samples=8"]
        proc = slim_main(f"scheme={scheme}", "eval=none", "logger=none", f"hydra.run.dir={run_dir}", *extra,
                         cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        target = [f"model.path={run_dir / 'checkpoint'}"]
    hf = _eval(tmp_path, "hf", *target, "eval.backend=hf")
    streamed = _eval(tmp_path, "streamed", *target, "eval.backend=streamed")
    _assert_same_scores(hf["metrics"]["model"], streamed["metrics"]["model"])
    for res, backend in ((hf, "hf"), (streamed, "streamed")):
        assert res["eval"] == {"backend": backend, "numerics": {"model": numerics}}


def test_streamed_backend_spills_hidden_states_to_disk(tmp_path):
    host = _eval(tmp_path, "host", "eval.backend=streamed", "eval.hidden_states=host")
    disk = _eval(tmp_path, "disk", "eval.backend=streamed", "eval.hidden_states=disk")
    assert host["metrics"]["model"] == disk["metrics"]["model"]
    assert not list((tmp_path / "disk" / "eval_spill").glob("hidden_states.*"))  # removed after the pass


def _refused(tmp_path, *args, env=None):
    proc = slim_main(*args, "logger=none", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoint").exists()  # refused before the quantize stage
    return errors[0]


def test_vllm_backend_without_its_python_is_refused(tmp_path):
    assert "SLIM_VLLM_PYTHON" in _refused(tmp_path, "eval.backend=vllm")


def test_vllm_backend_with_a_python_without_vllm_is_refused(tmp_path):
    line = _refused(tmp_path, "eval.backend=vllm", env={"SLIM_VLLM_PYTHON": sys.executable})
    assert "cannot import vllm" in line


def test_static_w4a8_with_vllm_backend_is_refused(tmp_path):
    line = _refused(tmp_path, "scheme=w4a8", "eval.backend=vllm")
    assert "eval.backend=streamed" in line and "w4a8_dynamic" in line


def test_static_w4a8_with_vllm_numerics_is_refused(tmp_path):
    assert "eval.numerics=sglang" in _refused(tmp_path, "scheme=w4a8", "eval.numerics=vllm")


def test_misspelled_task_is_refused(tmp_path):
    assert "hellaswg" in _refused(tmp_path, "eval.tasks=[slim_text_ppl,hellaswg]")


def test_generating_task_on_streamed_backend_names_vllm(tmp_path):
    line = _refused(tmp_path, "eval.backend=streamed", "eval.tasks=[gsm8k]")
    assert "gsm8k" in line and "eval.backend=vllm" in line


def test_hf_backend_refuses_a_model_larger_than_its_memory(tmp_path):
    line = _refused(tmp_path, "hardware.host_memory_gb=1")
    assert "eval.backend=streamed" in line
