"""Evaluation backends, by name, and the in-process ``hf`` backend.

    BACKENDS["hf"]        slim's loader builds the whole model in this process (simulated quantization) and
                          lm-eval's HFLM scores it: small and mid-size models
    BACKENDS["streamed"]  slim.evaluate_streamed: every request walks the model one decoder layer at a time,
                          weights read from the checkpoint layer by layer (DeepSeek-R1 on one GPU or CPU host)
    BACKENDS["vllm"]      slim.evaluate_vllm: the checkpoint directory served by vLLM from its own environment

A backend is ``fn(path, cfg, workdir, *, tokenizer, model, dist) -> {task: {metric: value}}`` where ``model``
carries the loading settings (:class:`ModelSettings`) and ``dist`` the job's ranks (rank 0 calls the backend; only
the streamed backend spreads its work over the others, see slim.eval_ranks). The lm-eval side that all of them share is ``slim.eval_tasks``;
nothing here is imported by a backend module, so there is no import cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from slim.config import EvalConfig
from slim.eval_tasks import run_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSettings:
    """How a checkpoint is read for evaluation (from ``model.*`` and ``hardware.*``)."""

    load_type: str = "bf16"
    dtype: str = "bfloat16"
    device: str = "cpu"
    trust_remote_code: bool = False
    numerics: str = "checkpoint"  # resolved (slim.models.numerics.resolve_numerics), never "auto"
    host_memory_gb: float = 0.0  # the hardware preset's host memory (0: unknown), for the streamed memory plan
    device_memory_gb: float = 0.0


def numerics_for(cfg: EvalConfig, path: Path) -> str:
    """``cfg.numerics`` resolved for the checkpoint at ``path`` (``auto``: its serving engine's)."""
    import json

    from slim.models.numerics import resolve_numerics

    config = json.loads((Path(path) / "config.json").read_text())
    return resolve_numerics(cfg.numerics, config.get("quantization_config"))


def model_settings(cfg, path: Path, load_type: str) -> ModelSettings:
    """The loading settings of a SlimConfig for the checkpoint at ``path``."""
    return ModelSettings(load_type=load_type, dtype=cfg.model.dtype, device=cfg.hardware.device,
                         trust_remote_code=cfg.model.trust_remote_code, numerics=numerics_for(cfg.eval, path),
                         host_memory_gb=cfg.hardware.host_memory_gb / max(cfg.hardware.procs_per_node, 1),
                         device_memory_gb=cfg.hardware.device_memory_gb)


def evaluate(model, tokenizer, cfg: EvalConfig, workdir: Path) -> dict[str, dict[str, float]]:
    """Run lm-eval on an in-memory model (slim's own loader built it from a checkpoint)."""
    from lm_eval.models.huggingface import HFLM

    # softmax_dtype=float32: lm-eval otherwise sums log-probs in the model dtype, and bf16 sums round to
    # multiples of several nats per document, coarser than the effects quantization has.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(model.device),
              softmax_dtype=torch.float32)
    return run_tasks(lm, cfg, workdir)


def evaluate_hf(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer, model: ModelSettings, dist=None):
    from slim.models.loading import load_model

    built = load_model(str(path), load_type=model.load_type, dtype=model.dtype,
                       trust_remote_code=model.trust_remote_code, device=model.device, numerics=model.numerics)
    try:
        return evaluate(built, tokenizer, cfg, workdir)
    finally:
        del built


def evaluate_vllm_backend(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer, model: ModelSettings,
                          dist=None):
    from slim.evaluate_vllm import evaluate_vllm

    return evaluate_vllm(path, path, cfg, workdir, trust_remote_code=model.trust_remote_code)


def evaluate_streamed_backend(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer, model: ModelSettings,
                              dist=None):
    from slim.evaluate_streamed import evaluate_streamed

    return evaluate_streamed(path, cfg, workdir, tokenizer=tokenizer, model=model, dist=dist)


BACKENDS: dict[str, Callable[..., dict[str, dict[str, float]]]] = {
    "hf": evaluate_hf,
    "streamed": evaluate_streamed_backend,
    "vllm": evaluate_vllm_backend,
}


def evaluate_checkpoint(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer,
                        model: ModelSettings, dist=None) -> dict[str, dict[str, float]]:
    """Score the checkpoint directory ``path`` with ``cfg.backend`` (a key of :data:`BACKENDS`)."""
    return BACKENDS[cfg.backend](Path(path), cfg, Path(workdir), tokenizer=tokenizer, model=model, dist=dist)
