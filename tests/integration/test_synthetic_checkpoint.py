"""The benchmark's synthetic DeepSeek checkpoint: R1's layout, the weights it means, and the real CLI quantizes it."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8_block, fp8_scale

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("synthetic_checkpoint", REPO / "experiments/bench/synthetic_checkpoint.py")
synth = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(synth)

SEED = 3
PROJ = ("gate_proj", "up_proj", "down_proj")


def read_all(path: Path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(path / shard, framework="pt") as f:
            for k in f.keys():
                assert index[k] == shard, k
                out[k] = f.get_tensor(k)
    assert out.keys() == index.keys()
    return out


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    # tiny width, 2 layers (1 dense + 1 MoE with 8 experts); small shards so the layers span several files
    out = tmp_path_factory.mktemp("synth") / "ds2"
    synth.write_synthetic_checkpoint(out, num_layers=2, hidden_size=256, moe_intermediate_size=128,
                                     n_routed_experts=8, seed=SEED, max_shard_bytes=256 << 10)
    return out


def test_layout_is_r1s(synthetic):
    config = json.loads((synthetic / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 256 and config["n_routed_experts"] == 8
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert config["intermediate_size"] == 3 * 256  # dense MLP keeps the embedded model's ratio
    assert (synthetic / "tokenizer.json").is_file()
    index = json.loads((synthetic / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    tensors = read_all(synthetic)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for e in range(8):  # experts stored per index, block FP8
        for p in PROJ:
            name = f"model.layers.1.mlp.experts.{e}.{p}.weight"
            assert tensors[name].dtype == FP8_DTYPE
            rows, cols = tensors[name].shape
            assert tensors[name + "_scale_inv"].shape == (-(-rows // 128), -(-cols // 128))
    assert not any("experts.8." in n or "gate_up_proj" in n for n in tensors)
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
    assert tensors["lm_head.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.down_proj.weight"].shape == (256, 768)
    # every tensor the model has, with its shape
    assert {n for n in tensors if not n.endswith("_scale_inv")} == {n for n, _ in synth.tensor_specs(config)}


def test_fp8_blocks_dequantize_to_the_intended_weights(synthetic):
    config = json.loads((synthetic / "config.json").read_text())
    tensors = read_all(synthetic)
    fp8 = [(n, s) for n, s in synth.tensor_specs(config) if tensors[n].dtype == FP8_DTYPE]
    assert len(fp8) == 2 * 5 + 3 + 3 + 3 * 8  # attention (2 layers), dense MLP, shared experts, routed experts
    for name, shape in fp8:
        w = synth.intended_tensor(name, shape, SEED)
        q, s = tensors[name], tensors[name + "_scale_inv"]
        assert tuple(q.shape) == shape
        blocks = torch.zeros(s.shape[0] * 128, s.shape[1] * 128)
        blocks[: shape[0], : shape[1]] = w.abs()
        amax = blocks.view(s.shape[0], 128, s.shape[1], 128).amax(dim=(1, 3))
        assert torch.equal(s, fp8_scale(amax)), name  # one scale per block: block amax / 448
        deq = dequantize_fp8_block(q, s, dtype=torch.float32)
        # e4m3 round to nearest: half a step, i.e. <= 2^-4 relative for normals, 2^-10 * scale for subnormals
        scale_full = s.repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
        assert ((deq - w).abs() <= w.abs() / 16 + scale_full / 1024 + 1e-12).all(), name
        sqnr = 10 * math.log10(w.pow(2).sum() / (deq - w).pow(2).sum())
        assert sqnr > 28, (name, sqnr)
    # realistic statistics: std ~0.02, block scales that differ, distinct tensors per expert
    w0 = synth.intended_tensor("model.layers.0.mlp.down_proj.weight", (256, 768), SEED)
    assert 0.015 < w0.std() < 0.03
    s0 = tensors["model.layers.0.mlp.down_proj.weight_scale_inv"]
    assert s0.max() / s0.min() > 1.2
    e0, e1 = (tensors[f"model.layers.1.mlp.experts.{e}.up_proj.weight"].float() for e in (0, 1))
    assert not torch.equal(e0, e1)
    # reproducible: the same seed gives the same bytes, another seed other weights
    again = synth.intended_tensor(name, shape, SEED)
    assert torch.equal(again, synth.intended_tensor(name, shape, SEED))
    assert not torch.equal(again, synth.intended_tensor(name, shape, SEED + 1))


def test_cli_quantizes_it(synthetic, tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "slim.main", f"model.path={synthetic}", "eval=none", "logger=none",
                           "calibration.num_samples=4", "calibration.seq_len=32", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = read_all(synthetic)
    out = read_all(run_dir / "checkpoint")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["checkpoint_bytes"] == sum(t.numel() * t.element_size() for t in out.values())
    quantized = {n[: -len(".weight")] for n, t in out.items() if n.endswith(".weight") and t.dtype == FP8_DTYPE}
    expected = {n[: -len(".weight")] for n in source if n.endswith("_proj.weight") or n.endswith("_mqa.weight")}
    assert quantized == expected  # every decoder Linear (experts included), not lm_head
    for e in range(8):
        for p in PROJ:
            assert f"model.layers.1.mlp.experts.{e}.{p}" in quantized
    for name in quantized:
        w, ws, xs = out[name + ".weight"], out[name + ".weight_scale"], out[name + ".input_scale"]
        assert w.shape == source[name + ".weight"].shape, name
        assert ws.numel() == 1 and xs.numel() == 1 and ws.item() > 0 and xs.item() > 0, name
        ref = dequantize_fp8_block(source[name + ".weight"], source[name + ".weight_scale_inv"], dtype=torch.float32)
        deq = w.float() * ws.float()
        sqnr = 10 * math.log10(ref.pow(2).sum() / (deq - ref).pow(2).sum())
        assert sqnr > 20, (name, sqnr)  # per-tensor FP8 of the source weights, not garbage
    assert out["lm_head.weight"].dtype == torch.bfloat16
    assert not any(n.endswith("_scale_inv") for n in out)
    config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["num_hidden_layers"] == 2 and config["hidden_size"] == 256
