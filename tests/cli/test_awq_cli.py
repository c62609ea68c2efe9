"""``algorithm=awq`` through the real CLI on the embedded model: it runs, the checkpoint verifies (every tensor's
digest read back), the smoothed norms and router are what was written, and the next-token distributions' KL
divergence to the unquantized model is printed next to RTN's (pytest -s shows them)."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from slim.config import ASSETS
from tests.helpers.accuracy import kl_to_bf16
from tests.helpers.cli import slim_main

pytestmark = pytest.mark.slow
SMALL = ["scheme=w4a8", "eval=none", "logger=none", "calibration.num_samples=8", "calibration.seq_len=128",
         "algorithm.search_samples=4", "algorithm.grid=10"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("awq_cli")
    out = {}
    for algo in ("rtn", "awq"):
        run_dir = tmp / algo
        proc = slim_main(f"algorithm={algo}", *SMALL, f"hydra.run.dir={run_dir}", cwd=tmp)
        assert proc.returncode == 0, proc.stderr[-4000:]
        out[algo] = run_dir / "checkpoint"
    return out


def _tensor(ckpt, name):
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(ckpt / index[name], framework="pt") as f:
        return f.get_tensor(name)


def test_awq_checkpoint_verifies_and_records_the_algorithm(runs):
    ckpt = runs["awq"]
    proc = subprocess.run([sys.executable, "-m", "slim.verify", str(ckpt)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads((ckpt / "config.json").read_text())["slim"]["algorithm"] == "awq"
    assert json.loads((ckpt / "config.json").read_text())["quantization_config"] == \
        json.loads((runs["rtn"] / "config.json").read_text())["quantization_config"]  # the same layout
    # every smoothed Linear says so in modules.json, with its mapping's search result
    mods = {m["name"]: m for m in json.loads((ckpt.parent / "modules.json").read_text())}
    smoothed = {n: m for n, m in mods.items() if m["algorithm"] == "awq"}
    assert "model.layers.1.mlp.experts.0.gate_proj" in smoothed, sorted(mods)[:8]
    assert all(m["algorithm_note"].startswith("awq: scales from ") for m in smoothed.values())
    assert {m["algorithm"] for m in mods.values()} <= {"awq", "rtn"}


def test_smoothed_norm_and_router_are_written(runs):
    """The MoE layers' post-attention norm and router differ from the source (smoothed), in the source's dtype;
    attention (not quantized by scheme=w4a8) keeps its norm bit for bit."""
    rtn, awq = runs["rtn"], runs["awq"]
    for name in ("model.layers.1.post_attention_layernorm.weight", "model.layers.1.mlp.gate.weight"):
        a, r = _tensor(awq, name), _tensor(rtn, name)
        assert a.dtype == r.dtype and a.shape == r.shape and not torch.equal(a, r), name
    name = "model.layers.1.input_layernorm.weight"
    assert torch.equal(_tensor(awq, name), _tensor(rtn, name))


def test_kl_to_bf16_next_to_rtn(runs):
    kl = kl_to_bf16(ASSETS / "tiny_deepseek", runs, rows=8, batch=4)
    print(f"KL(bf16 || w4a8) on held-out text: rtn {kl['rtn']:.5f}, awq {kl['awq']:.5f}")
    assert 0 < kl["awq"] < 2 * kl["rtn"], kl  # smoothing folded in consistently (a broken fold is far worse)
