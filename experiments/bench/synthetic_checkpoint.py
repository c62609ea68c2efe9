"""Write a random DeepSeek-V3-shaped checkpoint in DeepSeek-R1's published format, layer by layer.

    python experiments/bench/synthetic_checkpoint.py --num-layers 32 --out /tmp/ds32 \
        --hidden-size 1024 --moe-intermediate-size 512 --n-routed-experts 32 --seed 0

Layout as DeepSeek-R1-0528 ships: decoder Linear weights FP8 e4m3 with one fp32 ``weight_scale_inv`` per
128x128 block, routed experts stored per index (``mlp.experts.{e}.gate_proj.weight`` ...), router
correction bias fp32, everything else bf16, sharded ``model-XXXXX-of-XXXXX.safetensors`` + index. The config
is the embedded model's (``slim/assets/tiny_deepseek/config.json``) with the given overrides, and its
tokenizer is copied, so ``python -m slim.main model.path=DIR`` quantizes the result.

Memory: the model is never built. Names and shapes come from a meta-device skeleton; each tensor is drawn,
block-quantized and appended to the current shard, and a shard is written once it reaches
``max_shard_bytes``. Peak memory is about one shard, whatever the depth.

Weights: every tensor has its own generator (seeded from ``seed`` and its name), so a tensor can be
regenerated alone (:func:`intended_tensor`). Linear weights are normal with std ``weight_std``, times a
log-normal factor per 128x128 block, so block scales differ as they do in a trained model.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from slim.config import ASSETS
from slim.models.deepseek_fp8 import _FP8_WEIGHT, r1_config, split_experts
from slim.quant.fp8 import quantize_fp8_block

TINY = ASSETS / "tiny_deepseek"
BLOCK = (128, 128)
WEIGHT_STD = 0.02
BLOCK_LOG_STD = 0.3  # std of log(per-block magnitude factor)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def synthetic_config(num_layers: int, hidden_size: int | None = None, moe_intermediate_size: int | None = None,
                     n_routed_experts: int | None = None, **overrides) -> dict:
    """The embedded model's config.json with the overrides (R1 keys set by ``r1_config``).

    With a new ``hidden_size`` the dense MLP width keeps the embedded model's ratio (3x hidden) unless
    ``intermediate_size`` is given; a new ``num_attention_heads`` sets ``num_key_value_heads`` too (MLA).
    """
    cfg = json.loads((TINY / "config.json").read_text())
    cfg["num_hidden_layers"] = num_layers
    if hidden_size is not None:
        cfg["intermediate_size"] = 3 * hidden_size
        cfg["hidden_size"] = hidden_size
    if moe_intermediate_size is not None:
        cfg["moe_intermediate_size"] = moe_intermediate_size
    if n_routed_experts is not None:
        cfg["n_routed_experts"] = n_routed_experts
    cfg.update(overrides)
    if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]  # MLA: one KV head per query head
    if cfg["n_routed_experts"] % cfg["n_group"]:
        raise ValueError(f"n_routed_experts={cfg['n_routed_experts']} must be a multiple of n_group={cfg['n_group']}")
    cfg["num_nextn_predict_layers"] = 0
    return r1_config(cfg)


def tensor_specs(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor as DeepSeek stores it (experts per index), model order."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    hf = DeepseekV3Config(**{k: v for k, v in config.items() if k != "quantization_config"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    state = {k: v for k, v in model.state_dict().items()}
    return [(name, tuple(t.shape)) for name, t in split_experts(state)]


def layer_bytes(config: dict) -> dict[int, int]:
    """Bytes of each decoder layer's parameters as slim holds them in memory (bf16; router bias fp32)."""
    out: dict[int, int] = {}
    for name, shape in tensor_specs(config):
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            numel = 1
            for d in shape:
                numel *= d
            out[i] = out.get(i, 0) + numel * (4 if name.endswith("e_score_correction_bias") else 2)
    return out


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()) + (seed << 32))


def intended_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The fp32 value the generator means for ``name`` (what its FP8 blocks encode, before rounding)."""
    g = _generator(seed, name)
    if name.endswith("e_score_correction_bias"):
        return torch.zeros(shape)
    if name.endswith("norm.weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    w = torch.randn(shape, generator=g) * WEIGHT_STD
    if _FP8_WEIGHT.match(name):  # per-block magnitude, like the spread of block scales in a trained model
        rb, cb = -(-shape[0] // BLOCK[0]), -(-shape[1] // BLOCK[1])
        factor = torch.exp(BLOCK_LOG_STD * torch.randn(rb, cb, generator=g))
        w *= factor.repeat_interleave(BLOCK[0], 0)[: shape[0]].repeat_interleave(BLOCK[1], 1)[:, : shape[1]]
    return w


def stored_tensors(name: str, shape: tuple[int, ...], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """R1 dtypes: block-FP8 + ``weight_scale_inv`` for decoder Linears, fp32 router bias, bf16 otherwise."""
    t = intended_tensor(name, shape, seed)
    if _FP8_WEIGHT.match(name):
        q, scale_inv = quantize_fp8_block(t, BLOCK)
        yield name, q
        yield name + "_scale_inv", scale_inv
    elif name.endswith("e_score_correction_bias"):
        yield name, t.float()
    else:
        yield name, t.to(torch.bfloat16).contiguous()


def write_synthetic_checkpoint(out_dir: str | Path, num_layers: int, hidden_size: int | None = None,
                               moe_intermediate_size: int | None = None, n_routed_experts: int | None = None,
                               seed: int = 0, max_shard_bytes: int = 32 << 20, **overrides) -> Path:
    """Write the checkpoint shard by shard (several shards; a layer may span two, as in R1); return ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = synthetic_config(num_layers, hidden_size, moe_intermediate_size, n_routed_experts, **overrides)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    shards: list[tuple[str, list[str]]] = []
    total = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if not pending:
            return
        tmp = f"part-{len(shards) + 1:05d}.safetensors.tmp"
        save_file(pending, str(out / tmp), metadata={"format": "pt"})
        os.chmod(out / tmp, 0o644)  # safetensors creates owner-only files
        shards.append((tmp, sorted(pending)))
        pending, pending_bytes = {}, 0

    for name, shape in tensor_specs(config):
        for sname, t in stored_tensors(name, shape, seed):
            pending[sname] = t
            nbytes = t.numel() * t.element_size()
            pending_bytes += nbytes
            total += nbytes
            if pending_bytes >= max_shard_bytes:
                flush()
    flush()

    weight_map = {}
    for i, (tmp, names) in enumerate(shards, 1):
        final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / tmp, out / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    for f in TOKENIZER_FILES:
        shutil.copy2(TINY / f, out / f)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-layers", type=int, required=True)
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--moe-intermediate-size", type=int)
    p.add_argument("--n-routed-experts", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-mb", type=int, default=32, help="shard size (MiB) before a new shard starts")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="any other config.json override, e.g. --set num_experts_per_tok=8 --set first_k_dense_replace=3")
    args = p.parse_args(argv)
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    out = write_synthetic_checkpoint(args.out, args.num_layers, args.hidden_size, args.moe_intermediate_size,
                                     args.n_routed_experts, args.seed, args.max_shard_mb << 20, **overrides)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"{out}: {args.num_layers} layers, {len(list(out.glob('*.safetensors')))} shards, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
