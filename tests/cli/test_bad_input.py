"""Bad inputs fail before any heavy work, exit 2, and say what to fix (no traceback)."""

import json
import shutil

import pytest
import torch

from slim.config import ASSETS
from tests.helpers.cli import assert_refused, slim_main

pytestmark = pytest.mark.slow  # each case runs the CLI on the embedded model (config errors: unit/test_config.py)

QUICK = ["eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64"]


def embedded_copy(tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(ASSETS / "tiny_deepseek", dst)
    return dst


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


OFF = ["eval=none", "logger=none", "scheme=w4a8_dynamic", "calibration=none"]


@pytest.mark.parametrize("name,overrides", [
    ("model.layers.1.mlp.experts.3.up_proj.weight", QUICK),  # materialized
    ("model.layers.1.mlp.experts.3.up_proj.weight", OFF),  # FP8 straight to int4 (calibration off)
    ("model.layers.1.self_attn.o_proj.weight", OFF),  # ignored: decoded into the writer a block at a time
], ids=["materialized", "fp8-to-int4", "decoded-pieces"])
def test_nan_in_a_weight_names_the_tensor(tmp_path, name, overrides):
    from slim.verify import read_header

    model = embedded_copy(tmp_path)
    shard = model / "model.safetensors"
    header, start = read_header(shard)
    assert header[name]["dtype"] == "F8_E4M3"
    data = bytearray(shard.read_bytes())
    data[start + header[name]["data_offsets"][0] + 5] = 0x7F  # NaN in float8_e4m3fn
    shard.write_bytes(bytes(data))
    proc = slim_main(f"model.path={model}", *overrides, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, name, "1 NaN/Inf value(s)", "corrupt")


def test_overflowing_calibration_activations_name_the_layer(tmp_path):
    from safetensors.torch import load_file, save_file

    model = embedded_copy(tmp_path)
    shard = model / "model.safetensors"
    tensors = load_file(str(shard))
    norm = "model.layers.0.input_layernorm.weight"
    tensors[norm] = torch.full_like(tensors[norm], torch.finfo(tensors[norm].dtype).max)  # finite, overflows on use
    save_file(tensors, str(shard), metadata={"format": "pt"})
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "calibration activations became NaN/Inf in model.layers.0;", "model.dtype=float32")


def test_empty_calibration_set_is_an_error(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    proc = slim_main("calibration=jsonl", f"calibration.path={empty}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert_refused(proc, "has no text")


def test_a_small_calibration_set_warns_with_counts(tmp_path):
    small = tmp_path / "small.jsonl"
    text = (ASSETS / "data" / "calibration.jsonl").read_text().splitlines()[0]
    small.write_text(text + "\n")
    proc = slim_main("calibration=jsonl", f"calibration.path={small}", "eval=none", "logger=none",
                     "calibration.num_samples=500", "calibration.seq_len=64", f"hydra.run.dir={tmp_path / 'r'}",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = proc.stdout + proc.stderr
    assert "asked for 500 samples of 64 tokens, the text gives only" in log


def test_seq_len_beyond_the_model_maximum(tmp_path):
    proc = slim_main("calibration.seq_len=100000", *QUICK[:3], f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "calibration.seq_len=100000 exceeds the model's max_position_embeddings")


@pytest.mark.parametrize("override,fragments", [
    ("scheme=w4a9", ["Could not find 'scheme/w4a9'", "fp8_static", "w4a8", "w4a8_dynamic"]),
    ("hardware=h30", ["Could not find 'hardware/h30'", "h20x8", "cpu_x2"]),
    ("calibration.num_samples=many", ["calibration.num_samples", "could not be converted to Integer"]),
])
def test_unknown_choices_and_wrong_types_are_config_errors(tmp_path, override, fragments):
    proc = slim_main(override, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 1  # Hydra's exit code for a config that does not compose
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr


def test_ignore_pattern_matching_nothing(tmp_path):
    proc = slim_main("scheme.ignore_layers=[lm_head,self_atn]", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "self_atn")


def test_group_size_dividing_nothing(tmp_path):
    proc = slim_main("scheme=w4a8", "scheme.group_size=100", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "group_size 100 does not divide", "32, 64, 128", "ignore_layers")


def test_trust_remote_code_is_off_unless_asked(tmp_path):
    model = embedded_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "my_custom_moe"
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert_refused(proc, "trust_remote_code")
    assert "remote code ran" not in proc.stderr + proc.stdout
