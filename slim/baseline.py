"""The unquantized model's scores, computed once per source, compute and evaluation settings and reused across
runs (``eval.cache_baseline``, under ``$SLIM_CACHE_DIR/baselines``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path

from slim import __version__
from slim.cache import cache_dir
from slim.config import SlimConfig
from slim.rundir import atomic_json

log = logging.getLogger(__name__)


def baseline_key(cfg: SlimConfig, source: Path) -> str:
    """The unquantized model's scores depend on the source weights, compute settings, eval settings and tasks."""
    import lm_eval

    from slim.eval_tasks import TASKS_DIR

    task_files = sorted(TASKS_DIR.glob("*.yaml")) + sorted((TASKS_DIR.parent / "data").glob("*.jsonl"))
    payload = {
        "slim": __version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
        "source": str(source.resolve()),
        "source_files": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.glob("*.safetensors")),
        "model": {k: getattr(cfg.model, k) for k in ("load_type", "dtype")}, "device": cfg.hardware.device,
        "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("name", "baseline", "cache_baseline")},
        "tasks": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in task_files},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def baseline_metrics(cfg: SlimConfig, source: Path, score: Callable[[], dict]) -> tuple[dict, bool]:
    """The unquantized model's scores (``score()`` computes them) and whether they came from the cache."""
    path = cache_dir() / "baselines" / f"{baseline_key(cfg, source)}.json"
    if cfg.eval.cache_baseline and path.is_file():
        log.info("baseline scores reused from %s", path)
        return json.loads(path.read_text())["metrics"], True
    metrics = score()
    if cfg.eval.cache_baseline:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(path, {"model": str(source), "eval": dataclasses.asdict(cfg.eval), "metrics": metrics})
    return metrics, False
