"""Bad inputs fail before any heavy work, exit 2, and say what to fix (no traceback)."""

import json
import shutil

import pytest
from test_cli import slim_main

from slim.config import ASSETS

QUICK = ["eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64"]


def embedded_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(ASSETS / "tiny_deepseek", dst)
    return dst


def assert_refused(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]


def test_model_path_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = slim_main(f"model.path={tmp_path / 'empty'}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "no config.json", "model.path")


def test_pickle_weights_are_refused(tmp_path):
    model = embedded_copy(tmp_path)
    for f in model.glob("model*.safetensors*"):
        f.unlink()
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "pytorch_model.bin", "pickle files are never loaded")


def test_index_naming_a_missing_shard(tmp_path):
    model = embedded_copy(tmp_path)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: "model-00009-of-00009.safetensors" for k in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "model-00009-of-00009.safetensors", "missing")


def test_truncated_shard_is_named(tmp_path):
    model = embedded_copy(tmp_path)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: 1 << 20])
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "model.safetensors", "truncated or corrupt")


@pytest.mark.parametrize("load_type,message", [("bf16", "set model.load_type=fp8")])
def test_load_type_that_does_not_match_the_checkpoint(tmp_path, load_type, message):
    proc = slim_main(f"model.load_type={load_type}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, message)


def test_finished_checkpoint_is_not_overwritten_silently(tmp_path):
    run = tmp_path / "r"
    assert slim_main(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
    before = (run / "checkpoint" / "config.json").read_text()
    assert_refused(slim_main(*QUICK, f"hydra.run.dir={run}", cwd=tmp_path), "already holds a finished checkpoint", "overwrite=true")
    assert (run / "checkpoint" / "config.json").read_text() == before
    assert slim_main(*QUICK, "overwrite=true", f"hydra.run.dir={run}", cwd=tmp_path).returncode == 0
