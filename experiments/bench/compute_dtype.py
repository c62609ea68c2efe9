"""Benchmark: the default run's wall time on a CPU without native bf16 matmuls, bf16 vs ``model.dtype=auto``.

    python experiments/bench/compute_dtype.py --rounds 2

A machine with AVX-512 stands in for an AVX2-only one by restricting both of torch's kernel dispatchers
(``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``); ``model.dtype=auto`` then resolves to float32 as it
does on such a CPU. Each round runs the default command (``python -m slim.main logger=none``: calibrate, quantize,
export and evaluate the embedded model) once with ``model.dtype=bfloat16`` (the old default) and once with
``model.dtype=auto``, alternating, and records the wall time of each run and of each stage (from results.json).
Results go to ``experiments/bench/results/compute-dtype-<UTC time>.json``. It asserts nothing; it records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def run_once(dtype: str, run_dir: Path, threads: int, emulate_avx2: bool) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "SLIM_CACHE_DIR": str(run_dir.parent / "cache"), **(AVX2_ONLY if emulate_avx2 else {})}
    cmd = [sys.executable, "-m", "slim.main", "logger=none", f"model.dtype={dtype}", "eval.cache_baseline=false",
           f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((run_dir / "results.json").read_text())
    config = json.loads((run_dir / "checkpoint" / "config.json").read_text())
    resolved = next((line for line in (proc.stdout + proc.stderr).splitlines() if "model.dtype=auto" in line), None)
    return {"dtype": dtype, "wall_s": round(wall, 2), "stages_s": results.get("timings_s"),
            "checkpoint_dtype": config.get("torch_dtype"), "auto_log": resolved, "metrics": results.get("metrics")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--native", action="store_true", help="do not restrict the dispatchers to AVX2")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    import torch

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    report = {"benchmark": "compute_dtype", "utc": stamp,
              "git": {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "-uno"))},
              "machine": {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
                          "loadavg_start": os.getloadavg(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "emulated_avx2": not args.native, "threads": args.threads, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for dtype in ("bfloat16", "auto"):
                out = run_once(dtype, Path(tmp) / f"{dtype}-{r}", args.threads, not args.native)
                report["runs"].append({"round": r, **out})
                print(f"round {r} model.dtype={dtype}: {out['wall_s']} s, stages {out['stages_s']}", flush=True)
    report["machine"]["loadavg_end"] = os.getloadavg()
    path = args.out or HERE / "results" / f"compute-dtype-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
