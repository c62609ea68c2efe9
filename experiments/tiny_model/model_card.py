"""Write slim/assets/tiny_deepseek/README.md (the model card) from the training report."""

from __future__ import annotations

from pathlib import Path

import common


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def write(path: Path, report: dict) -> None:
    tr, ex, ev, ds = report["training"], report["export"], report["lm_eval"], report["data_stats"]
    k = common.MODEL_KWARGS
    hp = tr["hyperparameters"]
    sizes = report["file_sizes"]
    loads = "\n".join(
        f"| {name.replace('layer_', '')} | {v['min_over_mean']:.2f} | {v['max_over_mean']:.2f} | {v['experts_without_tokens']} |"
        for name, v in tr["heldout_expert_load"].items()
    )
    size_rows = "\n".join(f"| `{n}` | {_size(s)} |" for n, s in sizes.items())
    assets_total = sum(p.stat().st_size for p in common.ASSETS.rglob("*") if p.is_file())
    text = f"""---
license: apache-2.0
language: en
library_name: transformers
pipeline_tag: text-generation
tags: [deepseek_v3, fp8, moe, tiny, test-model]
---

# slim tiny DeepSeek-V3 (embedded default model)

A small but real language model with the **DeepSeek-V3 architecture** (`DeepseekV3ForCausalLM`: MLA attention,
a dense first layer, then sigmoid-routed MoE layers with group-limited top-k routing, a shared expert and
`e_score_correction_bias`), trained from scratch on English Wikipedia text and **published the way
DeepSeek-R1-0528 is**: every Linear weight inside the decoder layers in `float8_e4m3fn` with one fp32
`weight_scale_inv` per 128x128 block (`quantization_config = {{"quant_method": "fp8", "fmt": "e4m3",
"activation_scheme": "dynamic", "weight_block_size": [128, 128]}}`), routed experts stored per expert
(`model.layers.{{i}}.mlp.experts.{{e}}.{{gate,up,down}}_proj.weight`), embeddings, `lm_head`, norms and router weight
in bf16, `e_score_correction_bias` in fp32, no multi-token-prediction layer. It exists so that `slim` runs end to
end offline on a laptop CPU; it is not useful for anything else.

## Architecture
{tr["parameters"]:,} parameters. vocab {k["vocab_size"]}, hidden {k["hidden_size"]}, {k["num_hidden_layers"]} layers
(first {k["first_k_dense_replace"]} dense with intermediate {k["intermediate_size"]}, then MoE), {k["n_routed_experts"]} routed experts
(moe_intermediate {k["moe_intermediate_size"]}) + {k["n_shared_experts"]} shared, {k["num_experts_per_tok"]} routed experts per token chosen within the best
{k["topk_group"]} of {k["n_group"]} expert groups, routed_scaling_factor {k["routed_scaling_factor"]}, {k["num_attention_heads"]} heads, q_lora_rank
{k["q_lora_rank"]}, kv_lora_rank {k["kv_lora_rank"]}, qk_nope/rope/v head dims {k["qk_nope_head_dim"]}/{k["qk_rope_head_dim"]}/{k["v_head_dim"]},
default RoPE (theta {k["rope_theta"]}, interleaved), max positions {k["max_position_embeddings"]}, untied embeddings.
All Linear dimensions are multiples of 128 except `kv_a_proj_with_mqa` (576 rows = 512 + 64), whose last
block row is ragged, as in the real model. Tokenizer: byte-level BPE, 4,096 tokens, DeepSeek's
`<｜begin▁of▁sentence｜>` (id 0, prepended) and `<｜end▁of▁sentence｜>` (id 1) special tokens.

## Training data
{ds["n_articles"]} English Wikipedia articles from the dump extract that gensim 4.4.0 ships as test data, markup
stripped, split by article: train {ds["n_train_articles"]} articles ({ds["train_chars"]:,} chars,
{tr["train_split_tokens"]:,} tokens), held-out {ds["n_heldout_articles"]} articles ({ds["heldout_chars"]:,} chars). Text license:
CC BY-SA 3.0 (Wikipedia contributors). Details, checksums and the held-out titles: `../data/README.md`.

## Training
    pip install -e '.[train]'
    python experiments/tiny_model/prepare_data.py && python experiments/tiny_model/train.py

fp32 on CPU ({tr["threads"]} threads), AdamW (betas 0.9/0.95, weight decay {hp["weight_decay"]}), peak lr {hp["lr"]}, {hp["warmup"]} warmup
steps then cosine to {hp["min_lr_ratio"]}x, grad clip {hp["grad_clip"]}, {tr["steps"]} steps of {tr["batch_size"]}x{tr["seq_len"]} tokens
({tr["train_tokens_seen"]:,} tokens, {tr["epochs"]} epochs), seed {hp["seed"]}. Load balancing is DeepSeek-V3's
auxiliary-loss-free method: after each step every MoE layer's `e_score_correction_bias` moves by
+-{hp["bias_gamma"]} towards balanced expert load. Wall time of the training loop: **{tr["train_wall_seconds"] / 60:.1f} min**
(export and evaluation: {report["export_and_eval_seconds"]:.0f} s).

## Results (held-out articles, never seen in training)
| measure | value |
|---|---|
| final train loss (mean of last 50 steps) | {tr["final_train_loss_last50"]:.3f} |
| held-out token perplexity, fp32 trained model | **{tr["heldout_token_ppl_fp32"]:.2f}** |
| held-out token perplexity, add-one unigram of the train split | {tr["heldout_token_ppl_unigram_add1"]:.2f} |
| ratio model / unigram | {tr["ppl_ratio_model_over_unigram"]:.3f} |
| held-out token perplexity, shipped FP8 checkpoint (dequantized into bf16) | {ex["heldout_token_ppl_fp8_dequant_bf16"]:.2f} ({ex["fp8_vs_fp32_ppl_relative_change"]:+.2%} vs fp32) |
| lm-eval `slim_text_ppl` word_perplexity / byte_perplexity / bits_per_byte | {ev["slim_text_ppl"]["word_perplexity"]:.2f} / {ev["slim_text_ppl"]["byte_perplexity"]:.4f} / {ev["slim_text_ppl"]["bits_per_byte"]:.4f} |
| lm-eval `slim_text_mc` acc / acc_norm (chance 0.25) | {ev["slim_text_mc"]["acc"]:.3f} / {ev["slim_text_mc"]["acc_norm"]:.3f} |

Token perplexities are over the {tr["heldout_scored_tokens"]:,} held-out tokens (non-overlapping 256-token windows).
In `slim_text_mc` the 3 wrong continuations come from other held-out articles and are matched to the right one in
unigram log-probability, so only a model that uses the context beats chance (see `../data/README.md`).
The lm-eval numbers are for the shipped checkpoint (both tasks: {ev["seconds"]:.0f} s on this CPU).

Routed-expert load on the held-out text (share of routings relative to a perfectly even share; 1.00 = balanced):

| layer | min/mean | max/mean | experts without tokens |
|---|---|---|---|
{loads}

## Files
| file | size |
|---|---|
{size_rows}

All of `slim/assets` (model, data, tasks): {_size(assets_total)}.

## License
Weights and code: Apache-2.0 (the license of slim). Training and evaluation text: CC BY-SA 3.0, Wikipedia contributors.
"""
    path.write_text(text, encoding="utf-8")
