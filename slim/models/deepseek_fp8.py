"""Write a DeepSeek-V3 model the way DeepSeek-R1-0528 is published: block-FP8 Linear weights, experts per index.

Used to ship the embedded model, to build synthetic checkpoints for benchmarks and tests, and as the
reference of the on-disk layout slim reads with ``model.load_type=fp8``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from slim.quant.fp8 import quantize_fp8_block

R1_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# Linear weights stored as block FP8 in R1: everything inside the decoder layers except the router.
_FP8_WEIGHT = re.compile(r"^model\.layers\.\d+\..*_proj(_with_mqa)?\.weight$")
FP8_WEIGHT_RE = _FP8_WEIGHT  # public: the W4AFP8 format writes the same Linears as block FP8


def split_experts(state: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' fused experts -> DeepSeek's on-disk names.

    ``experts.gate_up_proj`` [E, 2I, H] -> ``experts.{e}.gate_proj.weight`` [I, H] and ``up_proj`` [I, H];
    ``experts.down_proj`` [E, H, I] -> ``experts.{e}.down_proj.weight`` [H, I].
    """
    for name, t in state.items():
        if name.endswith("experts.gate_up_proj"):
            base, inter = name[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                yield f"{base}{e}.gate_proj.weight", t[e, :inter]
                yield f"{base}{e}.up_proj.weight", t[e, inter:]
        elif name.endswith("experts.down_proj"):
            base = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                yield f"{base}{e}.down_proj.weight", t[e]
        else:
            yield name, t


def r1_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """R1 dtypes: decoder Linear weights block-FP8 + ``weight_scale_inv``; router bias fp32; the rest bf16."""
    out: dict[str, torch.Tensor] = {}
    for name, t in split_experts(state):
        if _FP8_WEIGHT.match(name):
            q, scale_inv = quantize_fp8_block(t)
            out[name], out[name + "_scale_inv"] = q, scale_inv
        elif name.endswith("e_score_correction_bias"):
            out[name] = t.float().contiguous()
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def r1_config(config_dict: dict) -> dict:
    """config.json keys the DeepSeek and vLLM loaders expect, on top of transformers' own."""
    cfg = dict(config_dict)
    cfg.update(
        architectures=["DeepseekV3ForCausalLM"],
        model_type="deepseek_v3",
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        torch_dtype="bfloat16",
        dtype="bfloat16",
        quantization_config=dict(R1_QUANTIZATION_CONFIG),
    )
    cfg.setdefault("num_nextn_predict_layers", 0)
    rope = cfg.get("rope_parameters") or {}
    cfg.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    return cfg


def save_r1_checkpoint(
    state: Mapping[str, torch.Tensor], config_dict: dict, out_dir: str | Path, tokenizer_dir: str | Path | None = None
) -> Path:
    """One-shard R1-layout checkpoint (safetensors + index + config + tokenizer files)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = r1_tensors(state)
    shard = "model-00001-of-00001.safetensors"
    save_file(tensors, str(out / shard), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: shard for n in sorted(tensors)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(r1_config(config_dict), indent=2, sort_keys=True) + "\n")
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file() and (f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json")):
                shutil.copy2(f, out / f.name)
    return out
