"""``python -m slim.main mode=sensitivity`` in a subprocess, as a user types it."""

import json
import shlex

import pytest

from slim.config import ASSETS
from tests.helpers.cli import slim_main

pytestmark = pytest.mark.slow  # end-to-end CLI runs on the embedded model


def test_sensitivity_run_writes_ranking_and_ignore_list(tmp_path):
    run_dir = tmp_path / "run"
    proc = slim_main("mode=sensitivity", "scheme=w4a8", "logger=none", f"hydra.run.dir={run_dir}",
                     "calibration.num_samples=4", "sensitivity.heldout_max_tokens=1024", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "sensitivity.json").read_text())
    markdown = (run_dir / "sensitivity.md").read_text()
    assert markdown.strip() in proc.stdout  # printed as written
    assert "| rank | group | pattern |" in markdown and report["override"] in markdown
    groups = [g["group"] for g in report["ranking"]]
    assert len(groups) == len(set(groups)) == 12 and "lm_head" in groups and "layers.1.routed_experts" in groups
    assert report["heldout"]["target_met"] and report["heldout"]["rel_delta"] <= report["heldout"]["target_delta"]
    assert shlex.split(report["override"])[0].startswith("scheme.ignore_layers=[")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["mode"] == "sensitivity" and results["sensitivity"]["ignore_layers"] == report["ignore_layers"]
    assert set(results["timings_s"]) == {"load", "calibrate", "rank", "search"}
    assert "quantize one group" in proc.stderr  # progress bar


def test_unknown_kind_lists_choices(tmp_path):
    proc = slim_main("mode=sensitivity", "sensitivity.kinds=[experts]", "logger=none", f"hydra.run.dir={tmp_path}/r",
                     cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sensitivity.kinds" in proc.stderr and "routed_experts" in proc.stderr and "Traceback" not in proc.stderr


def test_model_too_large_for_memory_is_refused(tmp_path):
    """Four DeepSeek-R1 decoder layers (config.json only: no weights are needed to decide) are ~70 GiB in bf16."""
    config = json.loads((ASSETS / "configs" / "deepseek_r1" / "config.json").read_text())
    config["num_hidden_layers"] = 4
    (tmp_path / "r1").mkdir()
    (tmp_path / "r1" / "config.json").write_text(json.dumps(config))
    proc = slim_main("mode=sensitivity", "model=deepseek_r1", f"model.path={tmp_path / 'r1'}", "hardware=cpu",
                     "logger=none", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds the whole model in memory" in proc.stderr and "hardware=cpu gives 24 GiB" in proc.stderr
    assert "Traceback" not in proc.stderr
