"""Compare the jobs of a sweep: ``python -m slim.compare <multirun dir> [--out DIR]``.

Reads every job's ``results.json`` (metrics, checkpoint size), ``modules.json`` (per-module SQNR) and
``.hydra/config.yaml`` (group_size, ignore_layers, observer) under the directory, prints a markdown table
(each quantized metric with its change vs. the job's own bf16 baseline) and writes ``compare.md``,
``compare.json``, ``metrics_vs_size.png`` and ``sqnr_per_layer.png``. Needs no W&B server.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slim.errors import SlimError
from slim.targets import KINDS, module_kind  # noqa: F401  (module_kind: part of this module's API)

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass
class Job:
    """One finished run of the sweep, read from its directory."""

    dir: Path
    name: str
    results: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    overrides: list[str] = field(default_factory=list)
    modules: list[dict[str, Any]] | None = None

    @property
    def scheme(self) -> dict[str, Any]:
        return self.config.get("scheme") or {}

    @property
    def metrics(self) -> dict[str, dict[str, dict[str, float]]]:
        return self.results.get("metrics") or {}


def _read_yaml(path: Path) -> Any:
    # plain YAML: the values we read are literals; interpolations (${...}) stay unresolved strings
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def _sort_key(path: Path, root: Path) -> tuple:
    rel = path.relative_to(root).parts
    return tuple((0, int(m.group(1)), p) if (m := re.match(r"(\d+)(?:_|$)", p)) else (1, 0, p) for p in rel)


def find_jobs(root: Path) -> tuple[list[Job], list[Path]]:
    """Every job with a results.json under ``root`` (in Hydra job order), and job dirs that have none."""
    root = Path(root)
    if not root.is_dir():
        raise SlimError(f"{root} is not a directory; pass a multirun dir such as outputs/multirun/<date>/<time>")
    found = sorted((p.parent for p in root.rglob("results.json") if "checkpoint" not in p.relative_to(root).parts),
                   key=lambda d: _sort_key(d, root))
    if not found:
        raise SlimError(f"no results.json under {root}: point at a multirun dir (outputs/multirun/<date>/<time>) "
                        "or a run dir whose jobs finished")
    jobs = []
    for d in found:
        rel = d.relative_to(root)
        modules_path = d / "modules.json"
        jobs.append(Job(
            dir=d, name=str(rel) if rel.parts else d.name,
            results=json.loads((d / "results.json").read_text()),
            config=_read_yaml(d / ".hydra" / "config.yaml") or {},
            overrides=list(_read_yaml(d / ".hydra" / "overrides.yaml") or []),
            modules=json.loads(modules_path.read_text()) if modules_path.is_file() else None,
        ))
    unfinished = sorted(p.parent for p in root.rglob(".hydra") if not (p.parent / "results.json").is_file())
    return jobs, unfinished


def job_labels(jobs: list[Job]) -> list[str]:
    """A short label per job: its number and the overrides that differ between the jobs."""
    common = set.intersection(*(set(j.overrides) for j in jobs)) if jobs else set()
    labels = []
    for i, job in enumerate(jobs):
        varying = [o.removeprefix("scheme.") for o in job.overrides if o not in common]
        labels.append(f"#{i} " + (" ".join(varying) if varying else job.name))
    return labels


def _rel_pct(base: float | None, quant: float | None) -> float | None:
    if base is None or quant is None or base == 0:
        return None
    return 100 * (quant - base) / abs(base)


def layer_sqnr(modules: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, float]]]:
    """Weight-quantization SQNR (dB) per module kind and decoder layer: mean, min, max and module count."""
    acc: dict[str, dict[int, list[float]]] = {}
    for m in modules:
        idx, value = layer_index(m["name"]), m.get("sqnr_db")
        if idx is None or value is None or not math.isfinite(value):
            continue
        acc.setdefault(module_kind(m["name"]), {}).setdefault(idx, []).append(float(value))
    return {kind: {i: {"mean": sum(v) / len(v), "min": min(v), "max": max(v), "count": len(v)}
                   for i, v in sorted(layers.items())}
            for kind, layers in sorted(acc.items(), key=lambda kv: KINDS.index(kv[0]))}


def _wandb_run(job_dir: Path) -> dict[str, Any] | None:
    """The job's W&B run directory and group, read from the run file (offline runs included)."""
    runs = sorted((job_dir / "wandb").glob("*run-*"))
    runs = [r for r in runs if r.is_dir() and list(r.glob("*.wandb"))]
    if not runs:
        return None
    info: dict[str, Any] = {"dir": str(runs[-1])}
    try:
        from slim.tracking import read_offline_run

        for record in read_offline_run(runs[-1]):
            if record.WhichOneof("record_type") == "run":
                info.update(id=record.run.run_id, group=record.run.run_group or None, name=record.run.display_name)
                break
    except Exception as exc:  # a partly written run file still leaves the table and plots useful
        info["error"] = str(exc)
    return info


def summarize(jobs: list[Job]) -> list[dict[str, Any]]:
    """One row per job with everything the table, the plots and compare.json need."""
    rows = []
    for job, label in zip(jobs, job_labels(jobs)):
        base, quant = job.metrics.get("baseline", {}), job.metrics.get("quantized", job.metrics.get("model", {}))
        metrics = {
            task: {m: {"baseline": base.get(task, {}).get(m), "quantized": v,
                       "delta_pct": _rel_pct(base.get(task, {}).get(m), v)} for m, v in sorted(ms.items())}
            for task, ms in sorted(quant.items())
        }
        nbytes = job.results.get("checkpoint_bytes")
        planned = nbytes is None and (job.results.get("plan") or {}).get("checkpoint_bytes") is not None
        if planned:  # mode=plan: the size the checkpoint will have, computed from config.json alone
            nbytes = job.results["plan"]["checkpoint_bytes"]
        scheme = job.scheme
        rows.append({
            "job": job.name, "label": label, "dir": str(job.dir),
            "model": job.results.get("model"), "scheme": job.results.get("scheme") or scheme.get("name"),
            "group_size": scheme.get("group_size"), "ignore_layers": scheme.get("ignore_layers"),
            "weight_observer": scheme.get("weight_observer"),
            "activation_observer": scheme.get("activation_observer"),
            "checkpoint_bytes": nbytes, "checkpoint_mib": None if nbytes is None else nbytes / 2**20,
            "checkpoint_planned": planned,
            "quantized_modules": None if job.modules is None else len(job.modules),
            "ignored_modules": len((job.results.get("quantization") or {}).get("ignored", [])),
            "fallbacks": len((job.results.get("quantization") or {}).get("fallbacks", [])),
            "metrics": metrics, "timings_s": job.results.get("timings_s", {}),
            "layer_sqnr": layer_sqnr(job.modules) if job.modules else {},
            "wandb": _wandb_run(job.dir),
        })
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)


def size_unit(rows: list[dict[str, Any]]) -> tuple[str, int]:
    """MiB for small checkpoints, GiB from 10 GiB on (DeepSeek-R1 is ~350 GiB)."""
    largest = max((r["checkpoint_bytes"] or 0 for r in rows), default=0)
    return ("GiB", 2**30) if largest >= 10 * 2**30 else ("MiB", 2**20)


def _size(row: dict[str, Any], div: int) -> str:
    if row["checkpoint_bytes"] is None:
        return "-"
    return f"{row['checkpoint_bytes'] / div:.2f}" + (" (plan)" if row["checkpoint_planned"] else "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def metric_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted({(t, m) for r in rows for t, ms in r["metrics"].items() for m in ms})


def compare_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: job settings, checkpoint size, and each quantized metric with its relative change vs. bf16.
    Jobs are named ``#<n>`` in sweep order (compare.md lists their directories)."""
    cols = metric_columns(rows)
    unit, div = size_unit(rows)
    head = ["job", "scheme", "group_size", "ignore_layers", "observer", f"checkpoint {unit}", "quantized modules"]
    lines = ["| " + " | ".join(head + [f"{t} {m}" for t, m in cols]) + " |",
             "|" + "---|" * 5 + "---:|" * (2 + len(cols))]
    first = next((r for r in rows if any(v["baseline"] is not None for ms in r["metrics"].values() for v in ms.values())),
                 None)
    if first is not None:
        base = [first["metrics"].get(t, {}).get(m, {}).get("baseline") for t, m in cols]
        lines.append("| bf16 baseline | - | - | - | - | - | - | " + " | ".join(_fmt(b) for b in base) + " |")
    for r in rows:
        cells = []
        for t, m in cols:
            v = r["metrics"].get(t, {}).get(m)
            if v is None:
                cells.append("-")
            else:
                d = v["delta_pct"]
                cells.append(_fmt(v["quantized"]) + ("" if d is None else f" ({d:+.2f}%)"))
        ignore = r["ignore_layers"]
        lines.append("| " + " | ".join(_cell(c) for c in [
            r["label"].split(" ", 1)[0],
            _fmt(r["scheme"]), _fmt(r["group_size"]),
            "-" if ignore is None else "[" + ", ".join(ignore) + "]",
            _fmt(r["weight_observer"]),
            _size(r, div),
            _fmt(r["quantized_modules"]),
        ] + cells) + " |")
    return "\n".join(lines)


def baseline_spread(rows: list[dict[str, Any]]) -> list[str]:
    """Metrics whose bf16 baseline differs between jobs (it should not: same model, same tasks)."""
    notes = []
    for t, m in metric_columns(rows):
        vals = [r["metrics"].get(t, {}).get(m, {}).get("baseline") for r in rows]
        vals = [v for v in vals if v is not None]
        if vals and max(vals) - min(vals) > 1e-9 * max(1.0, abs(max(vals))):
            notes.append(f"{t} {m}: baseline ranges {min(vals):.6g}..{max(vals):.6g} across jobs")
    return notes


# ---- plots (matplotlib's object API with the Agg canvas: no display, no global pyplot state) ----

def _figure(nplots: int, width: float = 5.0, height: float = 4.0):
    from matplotlib.figure import Figure

    ncols = min(nplots, 3)
    nrows = math.ceil(nplots / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 1.2), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[nplots:]:
        ax.set_visible(False)
    return fig, axes[:nplots]


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


_MARKERS = "osD^vP*Xh<>"


def _legend(fig, axes, rows: list[dict[str, Any]]) -> None:
    """One legend below the panels, jobs in sweep order (then the baseline line, if drawn)."""
    seen: dict[str, Any] = {}
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    order = [r["label"] for r in rows if r["label"] in seen] + [lab for lab in seen if lab == "bf16 baseline"]
    fig.legend([seen[lab] for lab in order], order, loc="outside lower center", ncols=min(2, len(order)), fontsize=9,
               frameon=False)


def plot_metrics_vs_size(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per task metric: the quantized value against checkpoint size, one labelled point per job,
    the bf16 baseline as a dashed line."""
    cols = metric_columns(rows)
    points = [r for r in rows if r["checkpoint_bytes"] is not None]
    if not cols or not points:
        return None
    unit, div = size_unit(rows)
    fig, axes = _figure(len(cols))
    colors = _colors(len(rows))
    for ax, (task, metric) in zip(axes, cols):
        for i, r in enumerate(rows):
            v = r["metrics"].get(task, {}).get(metric)
            if v is None or r["checkpoint_bytes"] is None or v["quantized"] is None:
                continue
            ax.scatter(r["checkpoint_bytes"] / div, v["quantized"], s=60, color=colors[i], marker=_MARKERS[i % len(_MARKERS)],
                       label=r["label"], zorder=3)
            ax.annotate(r["label"].split(" ", 1)[0], (r["checkpoint_bytes"] / div, v["quantized"]),
                        textcoords="offset points", xytext=(6, 4 + 8 * (i % 2)), fontsize=9)
        bases = [r["metrics"].get(task, {}).get(metric, {}).get("baseline") for r in rows]
        bases = [b for b in bases if b is not None]
        if bases:
            ax.axhline(sum(bases) / len(bases), color="0.4", linestyle="--", linewidth=1, label="bf16 baseline")
        ax.margins(0.15)
        ax.set_title(f"{task}: {metric}")
        ax.set_xlabel(f"checkpoint size ({unit})")
        ax.set_ylabel(f"{metric} (quantized)")
        ax.grid(True, alpha=0.3)
        ax.ticklabel_format(useOffset=False, axis="both", style="plain")
    _legend(fig, axes, rows)
    fig.suptitle("quantized metric vs. checkpoint size, per job")
    fig.savefig(path, dpi=110)
    return path


def plot_layer_sqnr(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """One panel per module kind: weight-quantization SQNR (dB) per decoder layer, one line per job; where a
    layer has several modules of the kind (routed experts, projections) the point is their mean and the bar
    spans min..max."""
    from matplotlib.ticker import MaxNLocator

    kinds = [k for k in KINDS if any(k in r["layer_sqnr"] for r in rows)]
    if not kinds:
        return None
    all_layers = [x for r in rows for layers in r["layer_sqnr"].values() for x in layers]
    fig, axes = _figure(len(kinds), width=5.2, height=3.8)
    colors = _colors(len(rows))
    for ax, kind in zip(axes, kinds):
        for i, r in enumerate(rows):
            layers = r["layer_sqnr"].get(kind)
            if not layers:
                continue
            xs = sorted(layers)
            shift = 0.08 * (i - (len(rows) - 1) / 2) if len(rows) > 1 else 0.0  # keep bars of jobs apart
            mean = [layers[x]["mean"] for x in xs]
            spread = [[m - layers[x]["min"] for m, x in zip(mean, xs)],
                      [layers[x]["max"] - m for m, x in zip(mean, xs)]]
            ax.errorbar([x + shift for x in xs], mean, yerr=spread if any(layers[x]["count"] > 1 for x in xs) else None,
                        marker=_MARKERS[i % len(_MARKERS)], color=colors[i], capsize=3, label=r["label"])
        ax.set_title(kind)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("weight SQNR (dB)")
        ax.set_xlim(min(all_layers) - 0.5, max(all_layers) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    _legend(fig, axes, rows)
    fig.suptitle("weight-quantization SQNR per decoder layer (higher = closer to bf16; missing = not quantized)")
    fig.savefig(path, dpi=110)
    return path


def compare(root: Path, out: Path | None = None) -> dict[str, Any]:
    """Read the sweep under ``root``, write compare.md/.json and the plots into ``out`` (default ``root``)."""
    root = Path(root)
    out = Path(out) if out is not None else root
    jobs, unfinished = find_jobs(root)
    rows = summarize(jobs)
    out.mkdir(parents=True, exist_ok=True)
    table = compare_table(rows)
    notes = baseline_spread(rows) + [f"no results.json (failed or unfinished): {p}" for p in unfinished]
    plots = [p for p in (plot_metrics_vs_size(rows, out / "metrics_vs_size.png"),
                         plot_layer_sqnr(rows, out / "sqnr_per_layer.png")) if p is not None]
    md = [f"# slim sweep: {root}", "", table, ""]
    md += [f"- {n}" for n in notes] + ([""] if notes else [])
    md += ["Jobs:", ""] + [f"- {r['label']}: `{r['job']}`" for r in rows] + [""]
    md += [f"![{p.stem}]({p.name})" for p in plots]
    (out / "compare.md").write_text("\n".join(md) + "\n")
    summary = {"root": str(root), "jobs": rows, "notes": notes, "plots": [str(p) for p in plots], "table": table}
    (out / "compare.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m slim.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a multirun dir (outputs/multirun/<date>/<time>) or any dir of runs")
    parser.add_argument("--out", type=Path, default=None, help="where compare.md/.json and the PNGs go (default: DIR)")
    args = parser.parse_args(argv)
    try:
        summary = compare(args.dir, args.out)
    except SlimError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary["table"])
    for note in summary["notes"]:
        print(f"note: {note}")
    out = args.out or args.dir
    print("wrote: " + ", ".join(str(out / n) for n in ("compare.md", "compare.json")) +
          "".join(f", {p}" for p in summary["plots"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
