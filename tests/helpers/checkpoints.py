"""Random-weight DeepSeek-V3 checkpoints in DeepSeek-R1's published layout (block FP8), small enough for unit tests."""

from __future__ import annotations

import torch


def tiny_deepseek_config(**overrides):
    """A random-weight DeepSeek-V3 config small enough for unit-speed tests (1 dense + 1 MoE layer)."""
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=128, kv_lora_rank=512,
        qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64, max_position_embeddings=512,
        num_nextn_predict_layers=0, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def write_random_deepseek(out_dir, tokenizer_dir, seed=0, dead_expert: int | None = None, **overrides):
    """Random DeepSeek-V3 in R1's published layout (block FP8). ``dead_expert``: router never picks it."""
    from transformers import DeepseekV3ForCausalLM

    from slim.models.deepseek_fp8 import save_r1_checkpoint

    torch.manual_seed(seed)
    config = tiny_deepseek_config(**overrides)
    model = DeepseekV3ForCausalLM(config)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for k in state:
        if k.endswith("e_score_correction_bias"):
            state[k] = torch.zeros_like(state[k])
            if dead_expert is not None:
                state[k][dead_expert] = -1e4
    return save_r1_checkpoint(state, config.to_dict(), out_dir, tokenizer_dir)


def add_mtp_layer(ckpt):
    """Append a DeepSeek multi-token-prediction layer (``model.layers.{num_hidden_layers}.*``) to a checkpoint."""
    import json

    from safetensors.torch import load_file, save_file

    config = json.loads((ckpt / "config.json").read_text())
    n = config["num_hidden_layers"]
    config["num_nextn_predict_layers"] = 1
    (ckpt / "config.json").write_text(json.dumps(config))
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    shard = next(iter(index["weight_map"].values()))
    tensors = load_file(str(ckpt / shard))
    prefix = f"model.layers.{n - 1}."
    mtp = {f"model.layers.{n}." + k[len(prefix):]: v.clone() for k, v in tensors.items() if k.startswith(prefix)}
    mtp[f"model.layers.{n}.enorm.weight"] = torch.ones(config["hidden_size"], dtype=torch.bfloat16)
    tensors.update(mtp)
    save_file(tensors, str(ckpt / shard), metadata={"format": "pt"})
    index["weight_map"].update({k: shard for k in mtp})
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    return sorted(mtp)


def read_all(path):
    """Every tensor of a checkpoint directory, by name, through its index (which must name exactly them)."""
    import json

    from safetensors import safe_open

    out = {}
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in set(index.values()):
        with safe_open(path / shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    assert set(out) == set(index)
    return out
