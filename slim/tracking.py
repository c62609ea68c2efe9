"""Run records: ``results.json`` in the run directory and the same figures in a W&B run (offline by default).

One W&B run per job and run directory: its id is a hash of the resolved run directory and the job (mode), passed
with ``resume="allow"``, so the rerun of an interrupted job continues the same run instead of opening another one
(offline, each attempt writes its own ``offline-run-*`` directory under that one id; ``wandb sync`` uploads them
into the one run). Its name says model, scheme, algorithm and run directory (:func:`run_name`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
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


def run_id(run_dir: str | Path, job: str) -> str:
    """The W&B run id of ``job`` in ``run_dir``: the same for every attempt there (a rerun resumes the run), another
    for any other run directory or job. 16 hex digits, within W&B's id alphabet."""
    return hashlib.sha256(f"{Path(run_dir).resolve()}\0{job}".encode()).hexdigest()[:16]


def run_name(model: str, scheme: str, algorithm: str, run_dir: str | Path, mode: str = "quantize") -> str:
    """``<model>-<scheme>-<algorithm>[-<mode>] <run dir>`` for a single run (the run directory relative to the working
    directory when inside it, else its last two parts: Hydra's date/time); ``<model>-<scheme>-<algorithm>[-<mode>]
    /<job number>:<overrides>`` for a job of a sweep (:func:`_job_name`), whose group names the sweep."""
    name = "-".join([model, scheme, algorithm] + ([mode] if mode != "quantize" else []))
    from hydra.types import RunMode

    hc = _hydra_job()
    if hc is not None and hc.mode == RunMode.MULTIRUN:
        return _job_name(name)
    where = Path(run_dir).resolve()
    try:
        label = str(where.relative_to(Path.cwd().resolve()))
    except ValueError:
        label = "/".join(where.parts[-2:])
    return f"{name} {label}"[:128]


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(v)]


class Tracker:
    """Thin W&B wrapper; ``logger=none`` (mode disabled) makes every call a no-op. Always ``finish()``.

    Under ``python -m slim.main -m ...`` every job of the sweep joins one W&B group (``sweep_group``)."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str, run_id: str | None = None):
        """``run_id``: see :func:`run_id` (None: W&B draws a new one, no resume)."""
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
            dir=str(run_dir), name=name, config=config, reinit="finish_previous",
            id=run_id, resume="allow" if run_id else None,
        )
        log.info("W&B run %s '%s' (%s%s) in %s", self.run.id, name, cfg.mode, f", group {group}" if group else "",
                 self.run.dir)

    def log(self, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.log(metrics)

    def summary(self, values: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(values)

    def metrics(self, values: dict[str, Any]) -> None:
        """Scores (:func:`flat_metrics`, deltas included): logged as metrics and set in the summary."""
        if self.run is not None and values:
            self.run.log(values)
            self.run.summary.update(values)

    def table(self, key: str, rows: list[dict[str, Any]]) -> None:
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        self.run.log({key: wandb.Table(columns=columns, data=[[r[c] for c in columns] for r in rows])})

    def modules(self, rows: list[dict[str, Any]], key: str = "modules", file: Path | None = None) -> None:
        """The per-module report (``modules.json`` rows): histograms of log10 input scales, log10 weight scales
        (per-module max and min) and weight SQNR; count, fallbacks, SQNR mean and min (overall and per module kind)
        and the worst module in the summary; the rows as tables, one while they fit W&B's row limit
        (``wandb.Table.MAX_ROWS``, beyond which W&B cuts a table), else one per decoder layer (``<key>/layers.<i>``,
        modules outside the layers in ``<key>/other``; a part still over the limit split in pieces). With ``file``
        (the ``modules.json`` written from ``rows``) also that file as a ``modules`` artifact, every row whatever the
        count: what scales to a model's ~45k quantized Linears."""
        if self.run is None or not rows:
            return
        import wandb

        columns = list(rows[0])
        clean = lambda v: None if isinstance(v, float) and not math.isfinite(v) else v  # noqa: E731
        payload: dict[str, Any] = {
            part: wandb.Table(columns=columns, data=[[clean(r.get(c)) for c in columns] for r in chunk])
            for part, chunk in _table_parts(rows, key, wandb.Table.MAX_ROWS).items()}
        for field in ("input_scale", "weight_scale_max", "weight_scale_min"):
            values = [math.log10(v) for v in _finite(r.get(field) for r in rows) if v > 0]
            if values:
                payload[f"{key}/log10_{field}"] = wandb.Histogram(values)
        sqnr = _finite(r.get("sqnr_db") for r in rows)
        if sqnr:
            payload[f"{key}/sqnr_db"] = wandb.Histogram(sqnr)
        self.run.log(payload)
        self.summary(module_summary(rows, key))
        if file is not None:
            artifact = wandb.Artifact(f"{key}-{self.run.id}", type="modules",
                                      metadata={"rows": len(rows), "columns": columns})
            artifact.add_file(str(file), name=f"{key}.json", policy="immutable")  # read at upload, not copied
            self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def _table_parts(rows: list[dict[str, Any]], key: str, limit: int) -> dict[str, list[dict[str, Any]]]:
    """``{key: rows}`` while they fit ``limit``; else rows by decoder layer, each part cut into pieces of ``limit``."""
    if len(rows) <= limit:
        return {key: rows}
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        m = _LAYER.search(r["name"])
        by_layer.setdefault(f"{key}/layers.{m.group(1)}" if m else f"{key}/other", []).append(r)
    parts = {}
    for part, chunk in by_layer.items():
        pieces = [chunk[i:i + limit] for i in range(0, len(chunk), limit)]
        parts |= {part: pieces[0]} if len(pieces) == 1 else {f"{part}.{j}": p for j, p in enumerate(pieces)}
    return parts


def module_summary(rows: list[dict[str, Any]], key: str = "modules") -> dict[str, Any]:
    """Count, fallbacks, weight SQNR mean and min (all modules and per module kind) and the module with the lowest."""
    from slim.targets import module_kind

    by_kind: dict[str, list[float]] = {}
    for r in rows:
        by_kind.setdefault(module_kind(r["name"]), []).extend(_finite([r.get("sqnr_db")]))
    out: dict[str, Any] = {f"{key}/count": len(rows), f"{key}/fallbacks": sum(bool(r.get("fallback")) for r in rows)}
    out |= {f"{key}/sqnr_db_mean/{kind}": sum(v) / len(v) for kind, v in by_kind.items() if v}
    out |= {f"{key}/sqnr_db_min/{kind}": min(v) for kind, v in by_kind.items() if v}
    if any(r.get("algorithm", "rtn") != "rtn" for r in rows):  # modules an algorithm left to round to nearest
        out[f"{key}/algorithm_fallbacks"] = sum(r.get("algorithm") == "rtn-fallback" for r in rows)
    scored = [(r["sqnr_db"], r["name"]) for r in rows if _finite([r.get("sqnr_db")])]
    if scored:
        worst = min(scored)
        out |= {f"{key}/sqnr_db_mean/all": sum(v for v, _ in scored) / len(scored),
                f"{key}/sqnr_db_min/all": worst[0], f"{key}/worst_module": worst[1]}
    return out


def flat_metrics(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """``{"baseline": {"task": {"m": v}}}`` -> ``{"baseline/task/m": v}``."""
    return {f"{which}/{task}/{m}": v for which, tasks in metrics.items() for task, ms in tasks.items() for m, v in ms.items()}


def metric_deltas(base: dict[str, dict[str, float]], quant: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """quantized - baseline, per task and metric present in both."""
    return {t: {m: quant[t][m] - v for m, v in ms.items() if m in quant.get(t, {})} for t, ms in base.items()}


def relative_deltas(base: dict[str, dict[str, float]], quant: dict[str, dict[str, float]]
                    ) -> dict[str, dict[str, float]]:
    """100 * (quantized - baseline) / |baseline|, per task and metric present in both with a nonzero baseline."""
    return {t: {m: 100 * (quant[t][m] - v) / abs(v) for m, v in ms.items() if m in quant.get(t, {}) and v}
            for t, ms in base.items()}


def scores(metrics: dict[str, dict[str, dict[str, float]]]) -> dict[str, float]:
    """What the tracker records of the scores: :func:`flat_metrics` of every evaluation, and where both the baseline
    and the quantized model were scored, ``delta/<task>/<metric>`` (quantized - baseline, :func:`metric_deltas`)
    and ``delta_pct/<task>/<metric>`` (relative, in %)."""
    out = dict(flat_metrics(metrics))
    if "baseline" in metrics and "quantized" in metrics:
        base, quant = metrics["baseline"], metrics["quantized"]
        out |= flat_metrics({"delta": metric_deltas(base, quant), "delta_pct": relative_deltas(base, quant)})
    return out


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
