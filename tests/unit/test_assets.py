"""The embedded model, tokenizer, data and tasks shipped in slim/assets (built by experiments/tiny_model)."""

from __future__ import annotations

import json
import math
import re

import pytest
import yaml
from safetensors import safe_open

from slim.config import ASSETS

MODEL = ASSETS / "tiny_deepseek"
DATA = ASSETS / "data"
BLOCK = 128
FP8, BF16, F32 = "F8_E4M3", "BF16", "F32"  # safetensors dtype names


@pytest.fixture(scope="module")
def config():
    return json.loads((MODEL / "config.json").read_text())


@pytest.fixture(scope="module")
def tensors():
    """name -> (safetensors dtype name, shape), without loading the data."""
    with safe_open(str(MODEL / "model.safetensors"), "pt") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}


def _jsonl(name):
    with open(DATA / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_config_keeps_the_hard_constraints(config):
    for k in ("hidden_size", "intermediate_size", "moe_intermediate_size"):
        assert config[k] % BLOCK == 0, k
    assert 1 <= config["first_k_dense_replace"] < config["num_hidden_layers"]
    assert config["kv_lora_rank"] == 512 and config["qk_rope_head_dim"] == 64
    assert config["architectures"] == ["DeepseekV3ForCausalLM"] and config["model_type"] == "deepseek_v3"
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    assert config["num_nextn_predict_layers"] == 0 and config["torch_dtype"] == "bfloat16"
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]
    }


def test_config_reads_back_with_transformers(config):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(MODEL))
    assert cfg.model_type == "deepseek_v3"
    for k in ("hidden_size", "num_hidden_layers", "n_routed_experts", "kv_lora_rank", "qk_rope_head_dim", "vocab_size"):
        assert getattr(cfg, k) == config[k], k


def test_tokenizer_loads_offline_and_prepends_bos(config):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL))
    assert len(tok) == config["vocab_size"]
    assert (tok.bos_token_id, tok.eos_token_id) == (config["bos_token_id"], config["eos_token_id"])
    ids = tok("Anthropology is the study of humans.")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Anthropology is the study of humans."


def _decoder_linears(config):
    """(name, [out, in]) of every nn.Linear inside the decoder layers, per-expert names for routed experts."""
    h, heads = config["hidden_size"], config["num_attention_heads"]
    qk = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        yield f"{p}.self_attn.q_a_proj", (config["q_lora_rank"], h)
        yield f"{p}.self_attn.q_b_proj", (heads * qk, config["q_lora_rank"])
        yield f"{p}.self_attn.kv_a_proj_with_mqa", (config["kv_lora_rank"] + config["qk_rope_head_dim"], h)
        yield f"{p}.self_attn.kv_b_proj", (heads * (config["qk_nope_head_dim"] + config["v_head_dim"]), config["kv_lora_rank"])
        yield f"{p}.self_attn.o_proj", (h, heads * config["v_head_dim"])
        if i < config["first_k_dense_replace"]:
            mlps = [(f"{p}.mlp", config["intermediate_size"])]
        else:
            inter = config["moe_intermediate_size"]
            mlps = [(f"{p}.mlp.shared_experts", inter * config["n_shared_experts"])]
            mlps += [(f"{p}.mlp.experts.{e}", inter) for e in range(config["n_routed_experts"])]
        for m, inter in mlps:
            yield f"{m}.gate_proj", (inter, h)
            yield f"{m}.up_proj", (inter, h)
            yield f"{m}.down_proj", (h, inter)


def test_every_decoder_linear_is_block_fp8(config, tensors):
    linears = dict(_decoder_linears(config))
    assert linears["model.layers.0.self_attn.kv_a_proj_with_mqa"] == (576, config["hidden_size"])  # ragged rows
    for name, shape in linears.items():
        assert tensors[f"{name}.weight"] == (FP8, shape), name
        scale = (math.ceil(shape[0] / BLOCK), math.ceil(shape[1] / BLOCK))
        assert tensors[f"{name}.weight_scale_inv"] == (F32, scale), name
    assert tensors["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1] == (5, 2)
    # nothing else is FP8, no fused experts, no MTP layer
    fp8 = {k[: -len(".weight")] for k, (dt, _) in tensors.items() if dt == FP8}
    assert fp8 == set(linears)
    assert not any("gate_up_proj" in k for k in tensors)
    assert not any(k.startswith(f"model.layers.{config['num_hidden_layers']}.") for k in tensors)


def test_other_tensors_are_bf16_and_router_bias_fp32(config, tensors):
    h, v = config["hidden_size"], config["vocab_size"]
    assert tensors["model.embed_tokens.weight"] == (BF16, (v, h))
    assert tensors["lm_head.weight"] == (BF16, (v, h))
    assert tensors["model.norm.weight"] == (BF16, (h,))
    for i in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
        assert tensors[f"model.layers.{i}.mlp.gate.weight"] == (BF16, (config["n_routed_experts"], h))
        assert tensors[f"model.layers.{i}.mlp.gate.e_score_correction_bias"] == (F32, (config["n_routed_experts"],))
    for k, (dt, _) in tensors.items():
        if "norm" in k:
            assert dt == BF16, k


def test_index_maps_every_tensor(tensors):
    index = json.loads((MODEL / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors)
    assert set(index["weight_map"].values()) == {"model.safetensors"}


def test_training_report_meets_the_bar():
    rep = json.loads((MODEL / "training_report.json").read_text())
    tr = rep["training"]
    assert tr["heldout_token_ppl_fp32"] <= tr["heldout_token_ppl_unigram_add1"] / 3
    assert abs(rep["export"]["fp8_vs_fp32_ppl_relative_change"]) <= 0.02
    assert rep["lm_eval"]["slim_text_mc"]["acc"] > 0.25


def test_data_files_parse():
    calib = _jsonl("calibration.jsonl")
    assert len(calib) >= 100 and all(isinstance(r["text"], str) and r["text"] for r in calib)
    ppl = _jsonl("heldout_ppl.jsonl")
    assert 10 <= len(ppl) <= 50 and all(500 <= len(r["text"]) <= 4000 for r in ppl)
    assert "CC BY-SA 3.0" in (DATA / "README.md").read_text()


def test_mc_items_are_well_formed():
    items = _jsonl("heldout_mc.jsonl")
    assert len(items) >= 100
    for it in items:
        assert it["context"] and len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        assert isinstance(it["label"], int) and 0 <= it["label"] < 4
    labels = [it["label"] for it in items]
    assert len(set(labels)) == 4  # the right answer is not always in the same place


def test_task_yamls_point_at_shipped_data():
    for name, output_type in (("slim_text_ppl", "loglikelihood_rolling"), ("slim_text_mc", "multiple_choice")):
        cfg = yaml.safe_load((ASSETS / "tasks" / f"{name}.yaml").read_text())
        assert cfg["task"] == name and cfg["output_type"] == output_type and cfg["dataset_path"] == "json"
        for rel in cfg["dataset_kwargs"]["data_files"].values():
            assert not re.match(r"^(/|[A-Za-z]:)", rel) and (ASSETS / rel).is_file(), rel
