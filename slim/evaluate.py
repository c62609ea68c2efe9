"""lm-eval glue: score a model on the configured tasks, offline.

The shipped tasks live in ``slim/assets/tasks/*.yaml`` with data paths relative to ``slim/assets``; they are
copied into the run directory with absolute paths, so the run records exactly what it evaluated.
Standard lm-eval tasks (gsm8k, arc, ...) are used by name on machines with dataset access.
Backends: ``hf`` scores a model loaded in this process; ``vllm`` (slim/evaluate_vllm.py) serves the checkpoint
directory from a separate vLLM environment. ``evaluate_checkpoint`` picks one by ``eval.backend``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from slim.config import ASSETS, EvalConfig

log = logging.getLogger(__name__)
TASKS_DIR = ASSETS / "tasks"


def prepare_tasks(dest: Path) -> Path:
    """Copy the shipped task YAMLs into ``dest`` with their data files made absolute."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASKS_DIR.glob("*.yaml")):
        spec = yaml.safe_load(src.read_text())
        files = spec.get("dataset_kwargs", {}).get("data_files", {})
        for split, rel in files.items():
            files[split] = str((ASSETS / rel).resolve())
        (dest / src.name).write_text(yaml.safe_dump(spec, sort_keys=False))
    return dest


def flatten_results(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval's ``{"task": {"metric,filter": v, "metric_stderr,filter": e}}`` -> ``{"task": {"metric": v}}``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            if metric in ("alias", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            out.setdefault(task, {})[metric] = float(value)
    return out


def run_tasks(model, cfg: EvalConfig, workdir: Path, **model_kwargs) -> dict[str, dict[str, float]]:
    """lm-eval's ``simple_evaluate`` over ``cfg.tasks``, offline, with the shipped tasks available.

    ``model`` is an lm-eval LM object or a registered model name (then ``model_kwargs`` carry its
    ``model_args`` and ``batch_size``); returns ``{task: {metric: value}}``.
    """
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING)  # keep the run log to slim's own stage lines
    task_dir = prepare_tasks(Path(workdir) / "lm_eval_tasks")
    out = lm_eval.simple_evaluate(
        model=model,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=TaskManager(include_path=str(task_dir)),
        bootstrap_iters=0,
        log_samples=False,
        verbosity="ERROR",
        **model_kwargs,
    )
    return flatten_results(out["results"])


def evaluate(model, tokenizer, cfg: EvalConfig, workdir: Path) -> dict[str, dict[str, float]]:
    """Run lm-eval on an in-memory model (slim's own loader built it from a checkpoint)."""
    from lm_eval.models.huggingface import HFLM

    # softmax_dtype=float32: lm-eval otherwise sums log-probs in the model dtype, and bf16 sums round to
    # multiples of several nats per document, coarser than the effects quantization has.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=cfg.batch_size, device=str(model.device),
              softmax_dtype=torch.float32)
    return run_tasks(lm, cfg, workdir)


def evaluate_checkpoint(path: Path, cfg: EvalConfig, workdir: Path, *, tokenizer, load: Callable[[Path], Any],
                        trust_remote_code: bool = False) -> dict[str, dict[str, float]]:
    """Score the checkpoint directory ``path`` with ``cfg.backend``.

    hf: ``load(path)`` builds the model in this process (slim's loader, simulated quantization) and lm-eval runs
    on it. vllm: the directory is served by vLLM from its own environment; ``load`` is not called and the
    tokenizer is read from ``path`` (exported checkpoints and source models carry their tokenizer files).
    """
    if cfg.backend == "vllm":
        from slim.evaluate_vllm import evaluate_vllm

        return evaluate_vllm(path, path, cfg, workdir, trust_remote_code=trust_remote_code)
    model = load(path)
    try:
        return evaluate(model, tokenizer, cfg, workdir)
    finally:
        del model
