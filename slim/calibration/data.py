"""Calibration text -> ``num_samples`` token sequences of exactly ``seq_len`` tokens.

Texts are shuffled with ``seed``, tokenized, joined with the EOS token and cut into full-length chunks:
packed, never padded, so every position carries real activations.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterable
from pathlib import Path

import torch

from slim.config import CalibrationConfig
from slim.errors import SlimError

log = logging.getLogger(__name__)


def read_texts(cfg: CalibrationConfig) -> list[str]:
    if cfg.source in ("embedded", "jsonl"):
        path = Path(cfg.path)
        if not path.is_file():
            raise SlimError(f"calibration file {path} does not exist; set calibration.path=<file.jsonl>")
        texts = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SlimError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
            if cfg.text_field not in record:
                raise SlimError(f"{path}:{lineno} has no field {cfg.text_field!r}; set calibration.text_field")
            texts.append(str(record[cfg.text_field]))
        return texts
    import datasets  # only for source=hf, which needs dataset access

    ds = datasets.load_dataset(cfg.dataset, split=cfg.split)
    return [str(t) for t in ds[cfg.text_field]]


def pack(token_lists: Iterable[list[int]], eos_id: int | None, num_samples: int, seq_len: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut [n, seq_len] chunks, n <= num_samples."""
    stream: list[int] = []
    need = num_samples * seq_len
    for ids in token_lists:
        stream.extend(ids)
        if eos_id is not None:
            stream.append(eos_id)
        if len(stream) >= need:
            break
    n = min(num_samples, len(stream) // seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


def check_seq_len(cfg: CalibrationConfig, max_positions: int | None) -> None:
    if max_positions is not None and cfg.seq_len > max_positions:
        raise SlimError(
            f"calibration.seq_len={cfg.seq_len} exceeds the model's max_position_embeddings={max_positions}; "
            f"use calibration.seq_len<={max_positions}"
        )


def calibration_tokens(cfg: CalibrationConfig, tokenizer, max_positions: int | None = None) -> torch.Tensor:
    """[num_samples, seq_len] int64 token ids."""
    check_seq_len(cfg, max_positions)
    texts = [t for t in read_texts(cfg) if t.strip()]
    if not texts:
        raise SlimError(f"the calibration source ({cfg.source}: {cfg.path or cfg.dataset}) has no text")
    random.Random(cfg.seed).shuffle(texts)
    token_lists = (tokenizer(t, add_special_tokens=True)["input_ids"] for t in texts)  # lazily, until full
    ids = pack(token_lists, tokenizer.eos_token_id, cfg.num_samples, cfg.seq_len)
    if ids.shape[0] == 0:
        raise SlimError(
            f"the calibration text has fewer than seq_len={cfg.seq_len} tokens; add text or lower calibration.seq_len"
        )
    if ids.shape[0] < cfg.num_samples:
        log.warning(
            "calibration: asked for %d samples of %d tokens, the text gives only %d; using %d",
            cfg.num_samples, cfg.seq_len, ids.shape[0], ids.shape[0],
        )
    return ids
