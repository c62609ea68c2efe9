"""lm-eval's side of every backend: the shipped tasks, ``simple_evaluate`` offline, and its results flattened.

The shipped tasks live in ``slim/assets/tasks/*.yaml`` with data paths relative to ``slim/assets``; they are
copied into the run directory with absolute paths, so the run records exactly what it evaluated.
Standard lm-eval tasks (gsm8k, arc, ...) are used by name on machines with dataset access.
Nothing here imports a backend: the backends (slim.evaluate, slim.evaluate_vllm, slim.evaluate_streamed)
import this module.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

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

