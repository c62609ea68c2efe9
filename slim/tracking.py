"""Run records: ``results.json`` in the run directory and the same figures in a W&B run (offline by default)."""

from __future__ import annotations

import json
import logging
import os
import resource
from pathlib import Path
from typing import Any

import torch

from slim.config import LoggerConfig

log = logging.getLogger(__name__)


def peak_memory() -> dict[str, float]:
    """Peak resident host memory of this process (and peak device memory on CUDA), in MiB."""
    out = {"host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        out["device_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    path = run_dir / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


class Tracker:
    """Thin W&B wrapper; ``logger=none`` (mode disabled) makes every call a no-op. Always ``finish()``."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str):
        self.run = None
        if cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=cfg.group, tags=list(cfg.tags),
            dir=str(run_dir), name=name, config=config, reinit="finish_previous",
        )
        log.info("W&B run %s (%s) in %s", self.run.id, cfg.mode, self.run.dir)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def flat_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``{"baseline": {"task": {"m": v}}}`` -> ``{"baseline/task/m": v}``."""
    return {f"{which}/{task}/{m}": v for which, tasks in metrics.items() for task, ms in tasks.items() for m, v in ms.items()}


def metric_deltas(base: dict[str, dict[str, float]], quant: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """quantized - baseline, per task and metric present in both."""
    return {t: {m: quant[t][m] - v for m, v in ms.items() if m in quant.get(t, {})} for t, ms in base.items()}


def results_table(metrics: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: task, metric, baseline, quantized, delta (relative, in %)."""
    base, quant = metrics.get("baseline", {}), metrics.get("quantized", {})
    lines = ["| task | metric | baseline | quantized | delta |", "|---|---|---:|---:|---:|"]
    for task in sorted(set(base) | set(quant)):
        for metric in sorted(set(base.get(task, {})) | set(quant.get(task, {}))):
            b, q = base.get(task, {}).get(metric), quant.get(task, {}).get(metric)
            fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
            delta = "-" if b in (None, 0) or q is None else f"{100 * (q - b) / abs(b):+.2f}%"
            lines.append(f"| {task} | {metric} | {fmt(b)} | {fmt(q)} | {delta} |")
    return "\n".join(lines)
