"""How far a quantized checkpoint's next-token distributions are from the unquantized model's, on held-out text."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[2] / "slim" / "assets"


def kl_to_bf16(source: Path, paths: dict[str, Path], rows: int = 32, batch: int = 8) -> dict[str, float]:
    """KL(source || quantized) of the next-token distributions, mean over ``rows`` x 256 positions of the shipped
    held-out text, per checkpoint in ``paths`` (bf16 compute): the distortion quantization causes, free of the
    noise a small perplexity set has."""
    from transformers import AutoTokenizer

    from slim.models.loading import load_model

    tok = AutoTokenizer.from_pretrained(str(source))
    texts = [json.loads(line)["text"] for line in (ASSETS / "data" / "heldout_ppl.jsonl").read_text().splitlines()]
    ids = torch.tensor(sum((tok(t)["input_ids"] for t in texts), [])[: rows * 256]).reshape(rows, 256)

    def logprobs(path):
        model = load_model(str(path), load_type="fp8", dtype="bfloat16", device="cpu")
        with torch.no_grad():
            return torch.cat([model(b).logits.float().log_softmax(-1) for b in ids.split(batch)])

    base = logprobs(source)
    return {name: (base.exp() * (base - logprobs(p))).sum(-1).mean().item() for name, p in paths.items()}
