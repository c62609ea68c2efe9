"""Run records: ``results.json`` in the run directory and the same figures in a W&B run (offline by default)."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import struct
from collections.abc import Iterator
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


def _hydra_job():
    """Hydra's runtime config of this job, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def sweep_group(group: str | None = None) -> str | None:
    """The W&B group of this job: ``logger.group`` when set; under ``-m`` (multirun) a name made from the sweep
    directory, so every job of one sweep lands in one group; otherwise None (a single run, no group)."""
    if group:
        return group
    from hydra.types import RunMode

    hc = _hydra_job()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return None
    sweep = Path(hc.sweep.dir).resolve()
    return f"sweep-{sweep.parent.name}_{sweep.name}"


def _job_name(name: str) -> str:
    """``name`` for a single run; ``name/<job number>:<overrides>`` inside a sweep, so its runs tell apart."""
    from hydra.types import RunMode

    hc = _hydra_job()
    if hc is None or hc.mode != RunMode.MULTIRUN:
        return name
    return f"{name}/{hc.job.num}:{hc.job.override_dirname}"[:128]


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


class Tracker:
    """Thin W&B wrapper; ``logger=none`` (mode disabled) makes every call a no-op. Always ``finish()``.

    Under ``python -m slim.main -m ...`` every job of the sweep joins one W&B group (``sweep_group``)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str):
        self.run = None
        if cfg.mode == "disabled":
            return
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb

        group = sweep_group(cfg.group)
        if group and isinstance(config.get("logger"), dict):
            config = {**config, "logger": {**config["logger"], "group": group}}
        self.run = wandb.init(
            project=cfg.project, entity=cfg.entity, mode=cfg.mode, group=group, tags=list(cfg.tags),
            dir=str(run_dir), name=_job_name(name), config=config, reinit="finish_previous",
        )
        log.info("W&B run %s (%s%s) in %s", self.run.id, cfg.mode, f", group {group}" if group else "", self.run.dir)

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

    def modules(self, rows: list[dict[str, Any]], key: str = "modules") -> None:
        """The per-module report (``modules.json`` rows) as a table, histograms of log10 input scales, log10
        weight scales (per-module max and min) and weight SQNR, and the mean SQNR per module kind in the summary."""
        if self.run is None or not rows:
            return
        import wandb

        from slim.targets import module_kind

        columns = list(rows[0])
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        payload: dict[str, Any] = {key: wandb.Table(columns=columns, data=[[clean(r.get(c)) for c in columns] for r in rows])}
        for field in ("input_scale", "weight_scale_max", "weight_scale_min"):
            values = [math.log10(v) for v in _finite(r.get(field) for r in rows) if v > 0]
            if values:
                payload[f"{key}/log10_{field}"] = wandb.Histogram(values)
        sqnr = _finite(r.get("sqnr_db") for r in rows)
        if sqnr:
            payload[f"{key}/sqnr_db"] = wandb.Histogram(sqnr)
        self.run.log(payload)
        by_kind: dict[str, list[float]] = {}
        for r in rows:
            by_kind.setdefault(module_kind(r["name"]), []).extend(_finite([r.get("sqnr_db")]))
        self.summary({f"{key}/sqnr_db_mean/{kind}": sum(v) / len(v) for kind, v in by_kind.items() if v}
                     | {f"{key}/count": len(rows), f"{key}/fallbacks": sum(bool(r.get("fallback")) for r in rows)}
                     # modules an algorithm (slim.algorithms) left to round to nearest; only where one ran
                     | ({f"{key}/algorithm_fallbacks": sum(r.get("algorithm") == "rtn-fallback" for r in rows)}
                        if any(r.get("algorithm", "rtn") != "rtn" for r in rows) else {}))

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


_LOG_BLOCK, _LOG_HEADER = 32768, 7  # the .wandb file is a LevelDB-style log: 32 KiB blocks, 7-byte record headers


def read_offline_run(path: str | Path) -> Iterator[Any]:
    """The records (``wandb_internal_pb2.Record``) of an offline W&B run: ``run-<id>.wandb`` or the run directory.

    What ``wandb sync`` would upload; for checking an offline run (group, logged keys) without a server."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.wandb"))
        if not files:
            raise FileNotFoundError(f"{path} holds no *.wandb run file")
        path = files[0]
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, parts = _LOG_HEADER, []
    while pos + _LOG_HEADER <= len(data):
        left = _LOG_BLOCK - pos % _LOG_BLOCK
        if left < _LOG_HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + _LOG_HEADER])
        pos += _LOG_HEADER
        if pos + length > len(data):  # a record still being written
            break
        chunk, pos = data[pos:pos + length], pos + length
        if kind == 0:  # zero padding up to the block end
            pos += _LOG_BLOCK - pos % _LOG_BLOCK if pos % _LOG_BLOCK else 0
            continue
        parts = [chunk] if kind in (1, 2) else parts + [chunk]  # full / first / middle / last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record
