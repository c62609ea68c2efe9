"""What slim trusts: broken source shards are all named before any work (and a repaired source resumes), index
entries stay inside the checkpoint, copied files are regular files, and no remote code runs for an architecture
slim refuses. Through the real CLI."""

import json
import shutil

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from slim.config import ASSETS
from tests.helpers.cli import assert_refused, slim_main

pytestmark = pytest.mark.slow

QUICK = ["eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64"]
refused = assert_refused


def three_shards(tmp_path):
    """The embedded model split into three shards by tensor name, with an index."""
    src, dst = ASSETS / "tiny_deepseek", tmp_path / "model"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors*"))
    with safe_open(str(src / "model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    names = sorted(tensors)
    parts = [names[i::3] for i in range(3)]
    weight_map = {}
    for i, part in enumerate(parts, 1):
        shard = f"model-{i:05d}-of-00003.safetensors"
        save_file({k: tensors[k] for k in part}, str(dst / shard), metadata={"format": "pt"})
        weight_map.update({k: shard for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_broken_shards_are_all_named_before_work_and_a_repaired_source_resumes(tmp_path):
    model = three_shards(tmp_path)
    good = {p.name: p.read_bytes() for p in model.glob("model-*.safetensors")}
    for name in ("model-00002-of-00003.safetensors", "model-00003-of-00003.safetensors"):
        (model / name).write_bytes(good[name][: len(good[name]) // 2])  # truncated in the data
    run = tmp_path / "run"
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    refused(proc, "2 source shard(s) cannot be read", "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors", "rerun the same command")
    assert not (run / "checkpoint").exists()  # nothing was quantized, nothing to resume or refuse later
    for name, data in good.items():
        (model / name).write_bytes(data)
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "checkpoint" / "config.json").is_file()


def test_index_shard_names_stay_in_the_checkpoint(tmp_path):
    model = three_shards(tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(model / "model-00001-of-00003.safetensors", outside)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    for bad in ("../outside.safetensors", str(outside)):
        weight_map = {k: bad if v.startswith("model-00001") else v for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
        refused(proc, f"names shard {bad!r}", "not a file name in", "fix the index")


def test_linked_tokenizer_file_is_refused_before_work(tmp_path):
    model = three_shards(tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (model / "tokenizer_config.json").rename(tmp_path / "tokenizer_config.json")
    (model / "tokenizer_config.json").symlink_to(tmp_path / "tokenizer_config.json")
    run = tmp_path / "run"
    proc = slim_main(f"model.path={model}", *QUICK, f"hydra.run.dir={run}", cwd=tmp_path)
    refused(proc, "tokenizer_config.json is a symbolic link", "replace it with the file itself")
    assert not (run / "checkpoint").exists()


def test_no_remote_code_runs_for_an_unsupported_architecture(tmp_path):
    model = three_shards(tmp_path)
    marker = tmp_path / "remote_code_ran"
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PretrainedConfig\n"
        "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="evil", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (model / "config.json").write_text(json.dumps(config))
    proc = slim_main(f"model.path={model}", "model.trust_remote_code=true", *QUICK,
                     f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    refused(proc, "model_type 'evil', which slim does not support")
    assert not marker.exists()
