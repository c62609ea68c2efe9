"""mode=sensitivity with a searching activation observer: the clip is chosen where its scores are computed."""

import json

import pytest

from tests.helpers.cli import slim_main

pytestmark = pytest.mark.slow  # end-to-end CLI runs on the embedded model


def test_sensitivity_with_mse_observer(tmp_path):
    run_dir = tmp_path / "run"
    proc = slim_main("mode=sensitivity", "scheme=fp8_static", "scheme.activation_observer=mse", "logger=none",
                     f"hydra.run.dir={run_dir}", "calibration.num_samples=4", "sensitivity.heldout_max_tokens=1024",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "sensitivity.json").read_text())
    assert len(report["ranking"]) == 12 and all(g["loss"] >= 0 for g in report["ranking"])
