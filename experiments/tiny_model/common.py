"""Shared pieces of the tiny-model recipe: paths, the model config, token streams and perplexity."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("RAYON_NUM_THREADS", "2")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

NUM_THREADS = 2
torch.set_num_threads(NUM_THREADS)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
WORK = HERE / "work"
ASSETS = ROOT / "slim" / "assets"
MODEL_DIR = ASSETS / "tiny_deepseek"
TOKENIZER_WORK = WORK / "tokenizer"
CKPT_FP32 = WORK / "model_fp32.safetensors"
TRAIN_METRICS = WORK / "train_metrics.json"
SEQ_LEN = 256

# Constraints marked (*) in the brief: hidden/intermediate/moe sizes multiples of 128 (whole FP8 blocks),
# >= 1 dense layer before the MoE layers, kv_lora_rank 512 and qk_rope_head_dim 64 (what vLLM's MLA expects).
MODEL_KWARGS = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    moe_intermediate_size=256,
    num_hidden_layers=4,
    first_k_dense_replace=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=256,
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=64,
    v_head_dim=64,
    max_position_embeddings=1024,
    rope_theta=10000,
    rope_interleave=True,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=1,
)


def build_config():
    from transformers import DeepseekV3Config

    return DeepseekV3Config(**MODEL_KWARGS)


def load_tokenizer(path: Path | str = TOKENIZER_WORK):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one stream, each as [BOS] text [EOS]; int64 [N]."""
    ids: list[int] = []
    for t in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(stream: torch.Tensor, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Non-overlapping windows [W, seq_len] (the last partial window dropped)."""
    n = stream.numel() // seq_len
    return stream[: n * seq_len].view(n, seq_len)


def target_mask(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Which tokens are scored: positions 1.. of each window, except BOS (trivially follows EOS). [W, L-1]"""
    return windows[:, 1:] != bos_id


class ExpertLoadRecorder:
    """Counts, per MoE layer, how many (token, slot) routings each routed expert receives."""

    def __init__(self, model):
        self.counts: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            gate = getattr(layer.mlp, "gate", None)
            if gate is None or not hasattr(gate, "e_score_correction_bias"):
                continue
            self.counts[i] = torch.zeros(gate.num_experts, dtype=torch.long)
            self.handles.append(gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(_module, _inp, out):
            topk_indices = out[2]  # [T, k]
            self.counts[i] += torch.bincount(topk_indices.reshape(-1).cpu(), minlength=self.counts[i].numel())

        return hook

    def reset(self) -> None:
        for c in self.counts.values():
            c.zero_()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def heldout_nll(model, windows: torch.Tensor, mask: torch.Tensor, batch_size: int = 16) -> tuple[float, int]:
    """Sum of token NLL (nats, in fp32) over the masked targets, and their count."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for s in range(0, windows.shape[0], batch_size):
        x = windows[s : s + batch_size]
        logits = model(input_ids=x).logits[:, :-1].float()  # [B, L-1, V]
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")
        m = mask[s : s + batch_size]
        total += float(nll[m].double().sum())
        count += int(m.sum())
    model.train(was_training)
    return total, count


def ppl(total_nll: float, count: int) -> float:
    return math.exp(total_nll / count)


def unigram_ppl(train_stream: torch.Tensor, windows: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed unigram model of the train tokens, scored on the same held-out targets."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    targets = windows[:, 1:][mask]
    return math.exp(float(-logp[targets].mean()))
