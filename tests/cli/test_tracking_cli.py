"""W&B through the real CLI, read back from the offline run files: a job that fails records its failure (exit code
1, through the pipeline, not a hand-called ``finish``); its rerun in the same run directory continues the same W&B
run (one run id) and logs the scores with their deltas against the baseline, as metrics and in the summary."""

from __future__ import annotations

import json

import pytest

from slim.tracking import run_id
from tests.helpers.cli import sitecustomize_env, slim_main
from tests.unit.test_tracking import _history, _records, _summary

pytestmark = pytest.mark.slow  # two CLI runs

FAST = ["calibration.num_samples=4", "eval.limit=4"]


def _fail_quantized_eval(tmp_path):
    """A sitecustomize that makes the evaluation of the quantized checkpoint raise (after the baseline is scored)."""
    return sitecustomize_env(
        tmp_path,
        "import os\n"
        "if os.environ.get('SLIM_TEST_FAIL_EVAL'):\n"
        "    import slim.pipeline as p\n"
        "    original = p.eval_stage\n"
        "    def eval_stage(cfg, target, *args, **kwargs):\n"
        "        if target.name == 'checkpoint':\n"
        "            raise RuntimeError('injected evaluation failure')\n"
        "        return original(cfg, target, *args, **kwargs)\n"
        "    p.eval_stage = eval_stage\n")


def _run_record(records):
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return run


def _exit_code(records):
    (exit_record,) = [r.exit for r in records if r.WhichOneof("record_type") == "exit"]
    return exit_record.exit_code


def test_failed_job_records_its_exit_then_the_rerun_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    env = _fail_quantized_eval(tmp_path)
    failed = slim_main(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path, env={**env, "SLIM_TEST_FAIL_EVAL": "1"})
    assert failed.returncode == 1 and "injected evaluation failure" in failed.stderr, failed.stderr[-3000:]
    (first,) = list((run_dir / "wandb").glob("offline-run-*"))
    records = _records(first)
    assert _exit_code(records) == 1  # RunRecord finished the run as failed
    run = _run_record(records)
    assert run.run_id == run_id(run_dir, "quantize")
    assert run.display_name == "tiny_deepseek-fp8_static-rtn run"  # model, scheme, algorithm, run dir (from cwd)
    assert "delta/slim_text_ppl/word_perplexity" not in _history(records)  # no quantized score, no delta

    resumed = slim_main(*FAST, f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # offline, each attempt writes its files; both under one run id: one W&B run on sync
    second = _records(next(r for r in runs if r != first))
    assert {_run_record(_records(r)).run_id for r in runs} == {run_id(run_dir, "quantize")}
    assert _exit_code(second) == 0

    results = json.loads((run_dir / "results.json").read_text())
    assert results["skipped_stages"] == ["quantize", "eval_baseline"]  # the rerun finished what was left
    history, summary = _history(second), _summary(second)
    delta = results["delta"]["slim_text_ppl"]["word_perplexity"]
    base = results["metrics"]["baseline"]["slim_text_ppl"]["word_perplexity"]
    assert delta != 0
    for where in (history, summary):
        assert where["delta/slim_text_ppl/word_perplexity"] == pytest.approx(delta)
        assert where["delta_pct/slim_text_ppl/word_perplexity"] == pytest.approx(100 * delta / base)
        assert where["delta/slim_text_mc/acc"] == pytest.approx(results["delta"]["slim_text_mc"]["acc"])
        assert where["baseline/slim_text_ppl/word_perplexity"] == pytest.approx(base)
    modules = json.loads((run_dir / "modules.json").read_text())
    assert summary["modules/count"] == len(modules)
