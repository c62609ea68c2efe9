"""Fault injection at every commit point: kill -9, rerun, compare every byte with an uninterrupted run.

    python experiments/bench/faults.py --layers 16 --jobs 2

Writes a random DeepSeek-V3-shaped checkpoint of ``--layers`` decoder layers (``synthetic_checkpoint.py``, tiny
sizes), runs ``python -m slim.main`` once uninterrupted, then once per kill point: the process is sent SIGKILL
right after the commit point of layer i is on disk (``slim.layout.ResumeSet.commit``, every layer in turn), and at
four points inside finalize (shards renamed; tokenizer copied; manifest written; index written, config.json not
yet). Each killed run is rerun with the same command; a point survives when the rerun exits 0, its log says it
resumed (or finalized), and every file of its checkpoint has the reference's bytes. The JSON summary (points
tried / survived, per point the reason of any failure) goes to ``experiments/bench/results/faults-<stamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "bench" / "results"

# module:attr[.method]:n:when (before | after the n-th call): SIGKILL to this process
SITE = textwrap.dedent('''
    import importlib, os, signal
    spec = os.environ.get("SLIM_BENCH_FAULT")
    if spec:
        mod_name, target, n, when = spec.split(":")
        n, owner = int(n), importlib.import_module(mod_name)
        *path, attr = target.split(".")
        for p in path:
            owner = getattr(owner, p)
        original, calls = getattr(owner, attr), [0]
        def wrapped(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            out = original(*args, **kwargs)
            if calls[0] == n and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        setattr(owner, attr, wrapped)
''')


def kill_points(layers: int) -> dict[str, str]:
    """label -> fault spec. Atomic writes: one commit.json per layer, written.json and its commit, then finalize's
    manifest, index and config.json; copied_files runs once in the source check and once in finalize."""
    points = {f"commit layer {i}": f"slim.layout:ResumeSet.commit:{i + 1}:after" for i in range(layers)}
    points |= {
        "finalize: shards renamed, nothing copied": "slim.export:copied_files:2:before",
        "finalize: tokenizer copied, no manifest": "slim.export:final_shard_names:2:before",
        "finalize: manifest written, no index": f"slim.export:atomic_write_text:{layers + 3}:before",
        "finalize: index written, no config.json": f"slim.export:atomic_write_text:{layers + 4}:before",
    }
    return points


def slim(args: list[str], run: Path, env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slim.main", *args, f"hydra.run.dir={run}"], cwd=run.parent,
                          env=env, capture_output=True, text=True, timeout=timeout)


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def try_point(label: str, spec: str, work: Path, args: list[str], env: dict[str, str], reference: dict[str, bytes],
              timeout: int) -> dict:
    run = work / ("run-" + "".join(c if c.isalnum() else "-" for c in label))
    t0 = time.perf_counter()
    killed = slim(args, run, {**env, "SLIM_BENCH_FAULT": spec}, timeout)
    out = {"point": label, "spec": spec, "killed": killed.returncode == -signal.SIGKILL}
    if not out["killed"]:
        return out | {"survived": False, "why": f"not killed (exit {killed.returncode}): {killed.stderr[-300:]}"}
    rerun = slim(args, run, env, timeout)
    log = rerun.stdout + rerun.stderr
    got = files(run / "checkpoint") if (run / "checkpoint").is_dir() else {}
    differ = sorted(n for n in reference.keys() | got.keys() if got.get(n) != reference.get(n))
    why = ([f"rerun exit {rerun.returncode}: {rerun.stderr[-300:]}"] if rerun.returncode else []) \
        + ([] if "resuming" in log or "finalizing" in log else ["the rerun did not resume"]) \
        + ([f"{len(differ)} file(s) differ: {differ[:5]}"] if differ else [])
    return out | {"survived": not why, "why": "; ".join(why), "seconds": round(time.perf_counter() - t0, 1),
                  "resumed_from": next((line.split(" - ")[-1] for line in log.splitlines()
                                        if "resuming after" in line or "finalizing" in line), None)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--jobs", type=int, default=2, help="kill points tried at once")
    p.add_argument("--timeout", type=int, default=600, help="seconds per slim run")
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="slim-faults-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not (model / "config.json").is_file():
        subprocess.run([sys.executable, str(ROOT / "experiments" / "bench" / "synthetic_checkpoint.py"),
                        "--num-layers", str(args.layers), "--out", str(model), "--hidden-size", "256",
                        "--moe-intermediate-size", "128", "--n-routed-experts", "8", "--max-shard-mb", "1"],
                       check=True, capture_output=True)
    (work / "site").mkdir(exist_ok=True)
    (work / "site" / "sitecustomize.py").write_text(SITE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
           "PYTHONPATH": os.pathsep.join([str(work / "site"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    slim_args = [f"model.path={model}", "eval=none", "logger=none", "calibration.num_samples=2",
                 "calibration.seq_len=32", "export.max_shard_mb=1"]
    t0 = time.perf_counter()
    ref = slim(slim_args, work / "reference", env, args.timeout)
    if ref.returncode:
        raise SystemExit(f"the uninterrupted run failed: {ref.stderr[-2000:]}")
    reference = files(work / "reference" / "checkpoint")
    points = kill_points(args.layers)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda kv: try_point(*kv, work, slim_args, env, reference, args.timeout),
                                points.items()))
    summary = {"layers": args.layers, "checkpoint_files": len(reference), "points_tried": len(results),
               "points_killed": sum(r["killed"] for r in results),
               "points_survived": sum(r["survived"] for r in results), "seconds": round(time.perf_counter() - t0, 1),
               "slim_args": slim_args, "points": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"faults-{time.strftime('%Y%m%dT%H%MZ', time.gmtime())}.json"
    out.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['points_survived']}/{summary['points_tried']} kill points survived "
          f"({summary['points_killed']} killed) -> {out}")
    for r in results:
        if not r["survived"]:
            print(f"  FAILED {r['point']}: {r['why']}")
    return 0 if summary["points_survived"] == summary["points_tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
