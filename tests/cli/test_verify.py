"""``python -m slim.verify``: a checkpoint's manifest, index, shards and scales, checked from the command line."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from slim.verify import read_header
from tests.helpers.cli import slim_main

pytestmark = pytest.mark.slow  # the fixture exports through the CLI; each case runs python -m slim.verify


def verify_cli(path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "slim.verify", str(path)], capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    proc = slim_main("eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64",
                     "export.max_shard_mb=1", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "run" / "checkpoint"


@pytest.fixture
def ckpt(exported, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(exported, dst)
    return dst


def shard_of(ckpt, name):
    return ckpt / json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"][name]


def test_a_fresh_export_verifies(ckpt):
    proc = verify_cli(ckpt)
    assert proc.returncode == 0, proc.stdout
    assert proc.stdout.startswith("ok:") and "checksums verified" in proc.stdout
    manifest = json.loads((ckpt / "slim_manifest.json").read_text())
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert set(manifest["tensors"]) == set(index["weight_map"])


def test_a_flipped_byte_is_found_and_named(ckpt):
    name = "model.layers.2.mlp.experts.5.down_proj.weight"
    shard = shard_of(ckpt, name)
    header, start = read_header(shard)
    offset = start + header[name]["data_offsets"][0] + 17
    data = bytearray(shard.read_bytes())
    data[offset] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = verify_cli(ckpt)
    assert proc.returncode == 1
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert failures == [f"FAIL {name} ({shard.name}): checksum mismatch, the bytes changed after export"]


def test_a_sha256_manifest_verifies_and_an_unknown_algorithm_is_named(ckpt):
    """export.checksum=sha256 (and checkpoints of slim before XXH3-128) write sha256 digests; verify reads the
    manifest's algorithm. A digest that does not match under it, or an algorithm it does not know, is a finding."""
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    manifest = json.loads((ckpt / "slim_manifest.json").read_text())
    assert manifest["algorithm"] == "xxh3_128"
    digests = {}
    for fname in set(index.values()):
        header, start = read_header(ckpt / fname)
        data = (ckpt / fname).read_bytes()
        for name, info in header.items():
            a, b = (start + o for o in info["data_offsets"])
            digests[name] = hashlib.sha256(data[a:b]).hexdigest()
    name = "model.layers.1.mlp.experts.0.gate_proj.weight_scale"
    digests[name] = hashlib.sha256(b"something else").hexdigest()
    manifest = {**manifest, "algorithm": "sha256",
                "tensors": {n: {"file": index[n], "sha256": digests[n]} for n in manifest["tensors"]}}
    (ckpt / "slim_manifest.json").write_text(json.dumps(manifest))
    proc = verify_cli(ckpt)
    assert proc.returncode == 1
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert failures == [f"FAIL {name} ({index[name]}): checksum mismatch, the bytes changed after export"]

    (ckpt / "slim_manifest.json").write_text(json.dumps({**manifest, "algorithm": "md5"}))
    proc = verify_cli(ckpt)
    assert proc.returncode == 1 and "checksums not checked" in proc.stdout
    failures = [line for line in proc.stdout.splitlines() if line.startswith("FAIL")]
    assert failures == ["FAIL slim_manifest.json: checksum algorithm 'md5' is unknown to this slim "
                        "(it knows xxh3_128, sha256); tensor checksums cannot be checked"]


def test_a_missing_or_truncated_shard_is_named(ckpt):
    shards = sorted(ckpt.glob("model-*.safetensors"))
    shards[1].unlink()
    shards[2].write_bytes(shards[2].read_bytes()[:-1000])
    proc = verify_cli(ckpt)
    assert proc.returncode == 1
    assert f"FAIL {shards[1].name}: named by the index but missing" in proc.stdout
    assert "truncated" in proc.stdout and shards[2].name in proc.stdout


@pytest.mark.parametrize("value,message", [(1.0, "exactly 1.0"), (float("nan"), "non-finite"), (0.0, "<= 0")])
def test_insane_scales_are_named(ckpt, value, message):
    name = "model.layers.1.mlp.experts.0.gate_proj.input_scale"
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    proc = verify_cli(ckpt)
    assert proc.returncode == 1
    assert f"FAIL {name}: " in proc.stdout and message in proc.stdout
    assert f"FAIL {name} ({shard.name}): checksum mismatch" in proc.stdout


def test_a_quantized_module_without_its_input_scale(ckpt):
    name = "model.layers.3.mlp.experts.7.up_proj.input_scale"
    shard = shard_of(ckpt, name)
    tensors = load_file(str(shard))
    del tensors[name]
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path = ckpt / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    del index["weight_map"][name]
    index_path.write_text(json.dumps(index))
    proc = verify_cli(ckpt)
    assert proc.returncode == 1
    assert "FAIL model.layers.3.mlp.experts.7.up_proj: static activations promised" in proc.stdout
    assert f"FAIL {name}: in the manifest but not in the index" in proc.stdout


def test_an_unfinished_export_is_not_a_checkpoint(ckpt):
    (ckpt / "config.json").unlink()
    proc = verify_cli(ckpt)
    assert proc.returncode == 2 and "unfinished export" in proc.stderr
