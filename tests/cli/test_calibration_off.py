"""calibration=none: weights only, no forward pass; the weights are those a calibrated run writes."""

import json

import pytest

from safetensors.torch import load_file

from tests.helpers.cli import assert_refused, slim_main

pytestmark = pytest.mark.slow  # end-to-end CLI runs on the embedded model


def tensors(ckpt):
    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_calibration_off_writes_the_calibrated_runs_weights(tmp_path):
    common = ["scheme=w4a8_dynamic", "eval=none", "logger=none"]
    off = slim_main(*common, "calibration=none", f"hydra.run.dir={tmp_path / 'off'}", cwd=tmp_path)
    assert off.returncode == 0, off.stderr[-3000:]
    log = (tmp_path / "off" / "main.log").read_text()
    assert "calibration off (calibration=none)" in log
    assert "calibration hidden states" not in log and "tokens per expert" not in log  # no forward pass ran
    on = slim_main(*common, "calibration.num_samples=4", "calibration.seq_len=64", f"hydra.run.dir={tmp_path / 'on'}",
                   cwd=tmp_path)
    assert on.returncode == 0, on.stderr[-3000:]
    assert "calibration hidden states" in (tmp_path / "on" / "main.log").read_text()

    a, b = tensors(tmp_path / "off" / "checkpoint"), tensors(tmp_path / "on" / "checkpoint")
    assert a.keys() == b.keys() and any(k.endswith(".weight_packed") for k in a)
    assert not any(k.endswith(".input_scale") for k in a)  # dynamic activations: nothing to calibrate
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].equal(b[k]), k

    config = json.loads((tmp_path / "off" / "checkpoint" / "config.json").read_text())
    assert config["slim"]["calibration"] is None
    assert config["quantization_config"]["config_groups"]["group_0"]["input_activations"]["dynamic"] is True
    modules = json.loads((tmp_path / "off" / "modules.json").read_text())
    assert modules and all(m["tokens"] == 0 and m["output_rel_err"] is None and m["sqnr_db"] > 10 for m in modules)


def test_cpu_kernels_write_the_torch_paths_bytes(tmp_path):
    """Calibration off on a CPU streams block-FP8 weights (FP8 straight to int4 in the fused kernel, ignored
    weights decoded a block of rows at a time); hardware.cpu_kernels=false materializes them and quantizes with
    torch. The shards are the same bytes."""
    common = ["scheme=w4a8_dynamic", "eval=none", "logger=none", "calibration=none"]
    runs = {}
    for kernels in ("true", "false"):
        run = tmp_path / kernels
        proc = slim_main(*common, f"hardware.cpu_kernels={kernels}", f"hydra.run.dir={run}", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[kernels] = sorted((run / "checkpoint").glob("*.safetensors"))
    assert "fused CPU kernels" in (tmp_path / "true" / "main.log").read_text()
    assert "fused CPU kernels" not in (tmp_path / "false" / "main.log").read_text()
    assert [p.name for p in runs["true"]] == [p.name for p in runs["false"]] and runs["true"]
    for a, b in zip(runs["true"], runs["false"]):
        assert a.read_bytes() == b.read_bytes(), a.name


def test_calibration_off_refuses_static_activation_scales(tmp_path):
    proc = slim_main("scheme=fp8_static", "calibration=none", "eval=none", "logger=none",
                     f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "scheme=fp8_static stores static activation scales", "w4a8_dynamic")
    assert not (tmp_path / "r" / "checkpoint").exists()
