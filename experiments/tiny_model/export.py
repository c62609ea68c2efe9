"""Export the trained tiny model the way DeepSeek-R1-0528 is published, verify it, evaluate it, report.

    python experiments/tiny_model/export.py     # after train.py --no-export (train.py calls this itself)

slim/assets/tiny_deepseek/ gets:
  model.safetensors (+ model.safetensors.index.json): every nn.Linear weight inside the decoder layers as
    float8_e4m3fn with an fp32 ``<name>_scale_inv`` of 128x128 blocks (slim.quant.fp8.quantize_fp8_block);
    routed experts stored per expert (``mlp.experts.{e}.{gate,up,down}_proj.weight``) as DeepSeek stores them;
    embeddings, lm_head, norms and the router weight in bf16, ``e_score_correction_bias`` in fp32.
  config.json (with R1's quantization_config), generation_config.json, tokenizer files,
  training_report.json, README.md (model card).
The checkpoint is then read back from disk (dequantized into a bf16 model) and its held-out perplexity
compared with the fp32 model's, and the lm-eval tasks of slim/assets/tasks are run on it.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import common
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from slim.models.deepseek_fp8 import R1_QUANTIZATION_CONFIG, r1_config, r1_tensors
from slim.quant.fp8 import dequantize_fp8_block

BLOCK = tuple(R1_QUANTIZATION_CONFIG["weight_block_size"])


# ----------------------------------------------------------------------------------------------------
# fp32 state dict (transformers layout) <-> DeepSeek on-disk layout
# ----------------------------------------------------------------------------------------------------
def to_deepseek_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers fp32 state -> R1 layout (slim.models.deepseek_fp8.r1_tensors, which uses
    slim.quant.fp8.quantize_fp8_block): per-expert names, block FP8 + weight_scale_inv, bf16/fp32 rest."""
    tensors = r1_tensors(state)
    for name, t in tensors.items():  # the layout contract this model is shipped with
        if name.endswith("_scale_inv"):
            continue
        want_fp8 = name.startswith("model.layers.") and t.ndim == 2 and not name.endswith("mlp.gate.weight")
        want = torch.float8_e4m3fn if want_fp8 else (torch.float32 if name.endswith("correction_bias") else torch.bfloat16)
        assert t.dtype == want, f"{name}: {t.dtype}, expected {want}"
        assert not want_fp8 or tensors[name + "_scale_inv"].shape == tuple(-(-d // b) for d, b in zip(t.shape, BLOCK))
    return dict(sorted(tensors.items()))


def from_deepseek_tensors(tensors: dict[str, torch.Tensor], num_experts: int, dtype=torch.bfloat16) -> dict:
    """Dequantize FP8 blocks and re-fuse the per-expert weights into transformers' layout."""
    state: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, t in tensors.items():
        if key.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = dequantize_fp8_block(t, tensors[key + "_scale_inv"], BLOCK, dtype)
        if ".mlp.experts." in key:
            prefix, rest = key.split(".mlp.experts.")
            e, proj, _ = rest.split(".")
            experts.setdefault(prefix, {}).setdefault(int(e), {})[proj] = t
        else:
            state[key] = t
    for prefix, per_expert in experts.items():
        assert sorted(per_expert) == list(range(num_experts)), f"{prefix}: experts {sorted(per_expert)}"
        state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]], dim=0) for e in range(num_experts)]
        )
        state[f"{prefix}.mlp.experts.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(num_experts)])
    return state


def load_exported_model(model_dir: Path = common.MODEL_DIR, dtype=torch.bfloat16):
    """Build from config.json (no .to(dtype) of a built model) and load the dequantized shipped weights."""
    from transformers import AutoConfig, DeepseekV3ForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    model = DeepseekV3ForCausalLM._from_config(config, dtype=dtype)
    tensors = load_file(str(model_dir / "model.safetensors"))
    state = from_deepseek_tensors(tensors, config.n_routed_experts, dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"missing {missing}, unexpected {unexpected}")
    return model.eval(), config


# ----------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------
def write_config(out: Path) -> dict:
    d = r1_config(common.build_config().to_dict())  # + architectures, topk_method, scoring_func, R1's quantization_config
    for k in ("id2label", "label2id", "problem_type", "output_hidden_states", "output_attentions",
              "return_dict", "chunk_size_feed_forward", "is_encoder_decoder", "_name_or_path"):
        d.pop(k, None)
    # keys of R1's config.json that vLLM's and DeepSeek's loaders read and transformers 5 no longer writes
    d.update({"num_nextn_predict_layers": 0, "moe_layer_freq": 1, "ep_size": 1,
              "rope_theta": common.MODEL_KWARGS["rope_theta"], "rope_scaling": None})
    assert d["quantization_config"] == R1_QUANTIZATION_CONFIG and d["dtype"] == d["torch_dtype"] == "bfloat16"
    d = dict(sorted(d.items()))
    (out / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    return d


def write_tokenizer(out: Path) -> None:
    for f in common.TOKENIZER_WORK.iterdir():
        shutil.copy(f, out / f.name)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    # the generic fast class (TokenizersBackend in transformers 5 is its alias), readable by transformers 4 too
    cfg.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True, "add_eos_token": False})
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    special = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token")}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")


def write_generation_config(out: Path) -> None:
    gen = {"_from_model_config": True, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
           "do_sample": True, "temperature": 0.6, "top_p": 0.95}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def export(out: Path = common.MODEL_DIR) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = load_file(str(common.CKPT_FP32))
    tensors = to_deepseek_tensors(state)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: "model.safetensors" for k in tensors}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(out)
    write_tokenizer(out)
    write_generation_config(out)
    n_fp8 = sum(1 for t in tensors.values() if t.dtype == torch.float8_e4m3fn)
    return {"tensors": len(tensors), "fp8_weights": n_fp8, "tensor_bytes": total}


# ----------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------
def verify(out: Path, metrics: dict) -> dict:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(str(out))
    for k, v in common.MODEL_KWARGS.items():
        got = getattr(config, k, None) if k != "rope_theta" else config.rope_parameters["rope_theta"]
        assert got == v, f"config.json read back {k}={got}, expected {v}"
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("Hello world")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, ids
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    model, _ = load_exported_model(out, torch.bfloat16)
    held = [r["text"] for r in common.read_jsonl(common.WORK / "heldout.jsonl")]
    windows = common.eval_windows(common.token_stream(tok, held))
    mask = common.target_mask(windows, tok.bos_token_id)
    bf16_ppl = common.ppl(*common.heldout_nll(model, windows, mask))
    fp32_ppl = metrics["heldout_token_ppl_fp32"]
    rel = bf16_ppl / fp32_ppl - 1
    print(f"shipped FP8 checkpoint (dequantized, bf16 model): held-out ppl {bf16_ppl:.3f} vs fp32 {fp32_ppl:.3f} "
          f"({rel:+.2%})", flush=True)
    if abs(rel) > 0.02:
        raise SystemExit(f"FP8 export changes held-out perplexity by {rel:+.2%} (> 2%)")
    return {"safetensors_dtypes": sorted(dtypes), "heldout_token_ppl_fp8_dequant_bf16": round(bf16_ppl, 3),
            "fp8_vs_fp32_ppl_relative_change": round(rel, 5)}


def file_sizes(out: Path) -> dict:
    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    data = common.ASSETS / "data"
    sizes.update({f"../data/{p.name}": p.stat().st_size for p in sorted(data.iterdir()) if p.is_file()})
    return sizes


def main(argv: list[str] | None = None) -> None:
    import eval_tasks
    import model_card

    out = common.MODEL_DIR
    metrics = json.loads(common.TRAIN_METRICS.read_text())
    t0 = time.time()
    info = export(out)
    print(f"exported {info} to {out}", flush=True)
    info.update(verify(out, metrics))
    model, _ = load_exported_model(out, torch.bfloat16)
    from transformers import AutoTokenizer

    lm_eval_results = eval_tasks.run(model, AutoTokenizer.from_pretrained(str(out)))
    print(json.dumps(lm_eval_results, indent=1), flush=True)
    acc = lm_eval_results["slim_text_mc"]["acc"]
    if acc <= 0.25 + 2 * lm_eval_results["slim_text_mc"]["acc_stderr"]:
        print(f"WARNING: slim_text_mc acc {acc} is not clearly above chance (0.25)", flush=True)
    report = {
        "model": "slim tiny DeepSeek-V3 (DeepseekV3ForCausalLM)",
        "training_command": "python experiments/tiny_model/prepare_data.py && python experiments/tiny_model/train.py",
        "data_stats": json.loads((common.WORK / "data_stats.json").read_text()),
        "training": metrics,
        "export": info,
        "lm_eval": lm_eval_results,
        "export_and_eval_seconds": round(time.time() - t0, 1),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    report["file_sizes"] = file_sizes(out)
    model_card.write(out / "README.md", report)
    report["file_sizes"] = file_sizes(out)  # README included
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}/training_report.json and README.md", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
