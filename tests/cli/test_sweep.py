"""A Hydra multirun through the real CLI, then ``python -m slim.compare`` on its sweep directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from slim.tracking import read_offline_run

pytestmark = pytest.mark.slow  # multirun sweeps through the CLI

REFERENCE = "[lm_head,self_attn,shared_experts,mlp.gate_proj,mlp.up_proj,mlp.down_proj]"  # = the w4a8 default
MORE = "[lm_head,self_attn]"  # also shared experts and dense MLPs in int4


def run(module, *args, cwd, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def wandb_run_record(job_dir, timeout_s=30.0):
    (run_dir,) = list((job_dir / "wandb").glob("offline-run-*"))
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_offline_run(run_dir))
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return runs[0] if runs else None
        time.sleep(0.2)


def test_group_size_by_ignore_layers_sweep_then_compare(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run("slim.main", "-m", "scheme=w4a8", "scheme.group_size=64,128", f"scheme.ignore_layers={REFERENCE},{MORE}",
               "eval.limit=4", "calibration.num_samples=4", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted((p for p in sweep.iterdir() if (p / "results.json").is_file()), key=lambda p: int(p.name.split("_")[0]))
    assert len(jobs) == 4
    results = [json.loads((j / "results.json").read_text()) for j in jobs]
    settings = [(64, REFERENCE), (64, MORE), (128, REFERENCE), (128, MORE)]  # Hydra's order: first key outermost
    for job, (g, ignore) in zip(jobs, settings):
        assert f"scheme.group_size={g}" in job.name and f"scheme.ignore_layers={ignore}" in job.name

    # every job's offline W&B run carries the one group of this sweep; single runs keep none (test_tracking)
    records = [wandb_run_record(j) for j in jobs]
    groups = {r.run_group for r in records}
    assert groups == {f"sweep-{tmp_path.name}_sweep"}
    assert len({r.display_name for r in records}) == 4

    report = tmp_path / "report"
    proc = run("slim.compare", str(sweep), "--out", str(report), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| #")]
    assert len(rows) == 4
    header = next(ln for ln in proc.stdout.splitlines() if ln.startswith("| job"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    ppl = cols.index("slim_text_ppl word_perplexity")
    for row, res, (g, ignore) in zip(rows, results, settings):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "w4a8" and cells[2] == str(g)
        assert cells[3] == ignore.replace(",", ", ")
        assert float(cells[5]) == pytest.approx(res["checkpoint_bytes"] / 2**20, abs=0.005)
        base = res["metrics"]["baseline"]["slim_text_ppl"]["word_perplexity"]
        quant = res["metrics"]["quantized"]["slim_text_ppl"]["word_perplexity"]
        assert cells[ppl] == f"{quant:.1f} ({100 * (quant - base) / base:+.2f}%)"

    summary = json.loads((report / "compare.json").read_text())
    mib = [j["checkpoint_mib"] for j in summary["jobs"]]
    count = [j["quantized_modules"] for j in summary["jobs"]]
    assert mib[0] > mib[2] and mib[1] > mib[3]  # group 64 stores twice the scales of group 128
    assert mib[0] > mib[1] and count[1] > count[0]  # int4 shared experts and dense MLPs shrink the checkpoint
    sqnr = [j["layer_sqnr"] for j in summary["jobs"]]
    assert set(sqnr[0]) == {"routed experts"}
    assert set(sqnr[1]) == {"routed experts", "shared expert", "dense mlp"}
    for layer, g64 in sqnr[0]["routed experts"].items():  # finer groups quantize the same weights more closely
        assert g64["mean"] > sqnr[2]["routed experts"][layer]["mean"]
    assert [j["wandb"]["group"] for j in summary["jobs"]] == [f"sweep-{tmp_path.name}_sweep"] * 4

    from matplotlib.image import imread

    for name in ("metrics_vs_size.png", "sqnr_per_layer.png"):
        img = imread(report / name)[..., :3]
        assert img.shape[0] >= 400 and img.shape[1] >= 800
        assert 0.01 < float((img.min(axis=-1) < 0.9).mean()) < 0.5
    assert (report / "compare.md").read_text().count("| #") == 4


def test_sweep_experiment_runs_its_grid_in_plan_mode(tmp_path):
    """`-m +experiment=sweep_ignore_layers` launches its four ignore lists; compare shows each planned size."""
    sweep = tmp_path / "sweep"
    proc = run("slim.main", "-m", "+experiment=sweep_ignore_layers", "mode=plan", "logger=none",
               f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = run("slim.compare", str(sweep), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in proc.stdout.splitlines() if ln.startswith("| #")]
    assert [r[3].count(",") for r in rows] == [5, 4, 1, 0]  # reference list ... all but lm_head
    sizes = [float(r[5].removesuffix(" (plan)")) for r in rows]
    assert all(r[5].endswith("(plan)") for r in rows)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]  # more int4 modules, smaller checkpoint


def test_compare_without_results_is_an_error(tmp_path):
    proc = run("slim.compare", str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no results.json under") and "Traceback" not in proc.stderr
