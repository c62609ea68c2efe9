"""Benchmark: the streamed evaluation backend on synthetic DeepSeek-R1-format checkpoints, shallow vs deep.

    python experiments/bench/eval_streamed.py --layers 4 32 --limit 8

For each depth a random checkpoint in R1's published layout (block FP8, experts per index; synthetic_checkpoint.py)
is scored by ``python -m slim.main mode=eval eval.backend=streamed`` on the embedded tasks, under /usr/bin/time -v
with an RSS poller (streaming.py). Reported per depth: wall time, peak RSS, the requests/tokens streamed (from the
run's log), and the memory plan's estimate for those tokens (slim.plan_eval.streamed_eval_bytes) twice: with the
plan's fixed runtime constant, and with the measured runtime (peak RSS of a process that imports what an
evaluation imports). Targets: peak RSS deep / shallow <= 1.15, estimate within 25% of the measured peak.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from streaming import REPO, git_head, monitored, slim_env  # noqa: E402
from synthetic_checkpoint import write_synthetic_checkpoint  # noqa: E402

IMPORTS = ("import torch, transformers, lm_eval, slim.main, slim.pipeline, slim.evaluate, slim.evaluate_streamed; "
           "from lm_eval.tasks import TaskManager; "
           "from transformers.models.deepseek_v3 import modeling_deepseek_v3")
_STREAMED_RE = re.compile(
    r"streamed (\d+) batches \((\d+) tokens, largest batch (\d+)\) through (\d+) layers, hidden states on (\w+)")


def plan_estimate(ckpt: Path, batch_tokens: int, tokens: int, runtime: int) -> dict:
    import torch

    from slim.models.adapters import build_skeleton, load_config
    from slim.plan_eval import RUNTIME_BYTES, streamed_eval_bytes

    model, adapter = build_skeleton(load_config(str(ckpt)), torch.bfloat16)
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in adapter.layers(model))
    need, where = streamed_eval_bytes(model.config, layer, 2, batch_tokens, tokens, "host")
    total = sum(need.values())
    return {"components_mib": {k: round(v / 2**20, 1) for k, v in need.items()}, "hidden_states_on": where,
            "plan_mib": round(total / 2**20, 1),
            "with_measured_runtime_mib": round((total - RUNTIME_BYTES + runtime) / 2**20, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    p.add_argument("--hidden-size", type=int, default=512)
    p.add_argument("--moe-intermediate-size", type=int, default=256)
    p.add_argument("--n-routed-experts", type=int, default=16)
    p.add_argument("--limit", type=int, default=8, help="eval.limit: documents per task")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-rss-gib", type=float, default=6.0)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slim-bench-eval"))
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    env = slim_env(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    runtime = monitored([sys.executable, "-c", IMPORTS], env, args.workdir, args.workdir / "imports.log")
    runtime_bytes = int(runtime["time_v_maxrss_mib"] * 2**20)
    report = {"git": git_head(), "args": {k: str(v) for k, v in vars(args).items()},
              "runtime_imports_mib": runtime["time_v_maxrss_mib"], "runs": {}}
    for n in args.layers:
        ckpt = write_synthetic_checkpoint(args.workdir / f"ckpt{n}", n, args.hidden_size,
                                          args.moe_intermediate_size, args.n_routed_experts)
        run_dir = args.workdir / f"run{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "slim.main", "mode=eval", f"model.path={ckpt}", "eval.backend=streamed",
               f"eval.limit={args.limit}", f"eval.batch_size={args.batch_size}", "eval.hidden_states=host",
               "logger=none", f"hydra.run.dir={run_dir}"]
        run = monitored(cmd, env, REPO, args.workdir / f"run{n}.log", limit_mib=args.max_rss_gib * 1024)
        text = (args.workdir / f"run{n}.log").read_text(errors="replace")
        passes = [{"batches": int(b), "tokens": int(t), "largest_batch_tokens": int(bt), "layers": int(nl),
                   "hidden_states_on": w} for b, t, bt, nl, w in _STREAMED_RE.findall(text)]
        run["passes"] = passes
        if passes and run["returncode"] == 0:
            tokens = max(x["tokens"] for x in passes)  # the estimate of the largest pass
            batch_tokens = max(x["largest_batch_tokens"] for x in passes)
            run["metrics"] = json.loads((run_dir / "results.json").read_text())["metrics"]
            run["estimate"] = plan_estimate(ckpt, batch_tokens, tokens, runtime_bytes)
            peak = run["time_v_maxrss_mib"]
            run["estimate"]["plan_vs_peak"] = round(run["estimate"]["plan_mib"] / peak, 3)
            run["estimate"]["measured_runtime_vs_peak"] = round(run["estimate"]["with_measured_runtime_mib"] / peak, 3)
        report["runs"][str(n)] = run
        shutil.rmtree(ckpt, ignore_errors=True)
    peaks = [report["runs"][str(n)].get("time_v_maxrss_mib") for n in args.layers]
    if all(peaks) and len(peaks) > 1:
        report["deep_vs_shallow_peak"] = round(peaks[-1] / peaks[0], 3)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%MZ")
    out = args.out or HERE / "results" / f"eval-streamed-{stamp}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=1))
    for n, run in report["runs"].items():
        print(n, "layers:", run.get("time_v_maxrss_mib"), "MiB peak,", run.get("wall_s"), "s,",
              run.get("estimate", {}).get("plan_vs_peak"), run.get("estimate", {}).get("measured_runtime_vs_peak"))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
