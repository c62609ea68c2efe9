"""The real CLI, in a subprocess, as a user types it."""

import json

import pytest
import torch
from safetensors import safe_open

from tests.helpers.cli import slim_main



@pytest.mark.slow
def test_default_run_quantizes_evaluates_and_logs(tmp_path):
    run_dir = tmp_path / "run"
    proc = slim_main(f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| task | metric | baseline | quantized | delta |" in proc.stdout
    results = json.loads((run_dir / "results.json").read_text())
    for which in ("baseline", "quantized"):
        assert set(results["metrics"][which]) == {"slim_text_ppl", "slim_text_mc"}
    base, quant = results["metrics"]["baseline"], results["metrics"]["quantized"]
    # fp8_static keeps the embedded model's word perplexity within 1% of bf16
    assert abs(quant["slim_text_ppl"]["word_perplexity"] / base["slim_text_ppl"]["word_perplexity"] - 1) < 0.01
    assert base["slim_text_mc"]["acc"] > 0.3  # a real language model: chance is 0.25
    assert set(results["timings_s"]) >= {"load", "quantize", "eval_baseline", "eval_quantized"}
    assert results["peak_memory"]["host_rss_mib"] > 0
    ckpt = run_dir / "checkpoint"
    assert results["checkpoint"] == str(ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    assert (ckpt / "tokenizer.json").is_file()
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and list(offline_runs[0].glob("*.wandb"))


def test_unknown_scheme_lists_choices(tmp_path):
    proc = slim_main("scheme=int3", cwd=tmp_path)
    assert proc.returncode != 0
    assert "fp8_static" in proc.stderr and "w4a8" in proc.stderr


@pytest.mark.slow
def test_ignore_pattern_matching_nothing_fails_before_quantizing(tmp_path):
    proc = slim_main("scheme.ignore_layers=[lm_haed]", "eval=none", "logger=none", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 2
    assert "lm_haed" in proc.stderr and "match no quantizable module" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoint" / "config.json").exists()


@pytest.mark.slow
def test_w4a8_on_bf16_variant_writes_packed_experts(tmp_path):
    run_dir = tmp_path / "run"
    proc = slim_main("model=tiny_deepseek_bf16", "scheme=w4a8", "eval=none", "logger=none", f"hydra.run.dir={run_dir}",
                     "calibration.num_samples=8", cwd=tmp_path, env={"SLIM_CACHE_DIR": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "cache" / "tiny_deepseek_bf16" / "config.json").is_file()  # converted once from fp8
    ckpt = run_dir / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    qcfg = config["quantization_config"]
    assert qcfg["format"] == "pack-quantized"
    assert qcfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.experts.0.down_proj.weight_packed" in index
    assert "model.layers.1.mlp.shared_experts.down_proj.weight" in index  # reference ignore list
    assert "model.layers.0.self_attn.q_a_proj.weight" in index
    with safe_open(ckpt / index["model.layers.0.self_attn.q_a_proj.weight"], framework="pt") as f:
        assert f.get_tensor("model.layers.0.self_attn.q_a_proj.weight").dtype == torch.bfloat16

    # mode=eval scores an existing checkpoint without quantizing (here: the one just written)
    eval_dir = tmp_path / "eval"
    proc = slim_main("mode=eval", f"model.path={ckpt}", "eval.limit=8", "logger=none", f"hydra.run.dir={eval_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((eval_dir / "results.json").read_text())
    assert results["mode"] == "eval" and "checkpoint" not in results
    assert results["metrics"]["model"]["slim_text_ppl"]["word_perplexity"] > 1
