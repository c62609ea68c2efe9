"""Benchmark: does slim's memory stay flat with depth, and how fast does it quantize+write vs a plain copy?

    python experiments/bench/streaming.py                       # 4- and 32-layer checkpoints, the --runs below
    python experiments/bench/streaming.py --layers 4 8 --runs w4a8_dynamic:off fp8_static:1x16 --hidden-size 1024

For each depth it writes a synthetic DeepSeek-V3 checkpoint in R1's format (``synthetic_checkpoint.py``,
same width for every depth), reads its shards once so the page cache is warm, times a plain copy of those
shards (``shutil.copyfile``), then runs the real CLI in a subprocess per scheme and calibration setting::

    python -m slim.main model.path=DIR eval=none logger=none scheme=S calibration=none hydra.run.dir=RUN
    python -m slim.main model.path=DIR eval=none logger=none scheme=S calibration.num_samples=N
        calibration.seq_len=L hydra.run.dir=RUN

under ``/usr/bin/time -v`` while polling the process tree's RSS (and its anonymous/file-backed split from
``/proc/<pid>/status``). The fixed runtime overhead is the peak RSS of a process that only imports what a
run imports. Results go to ``experiments/bench/results/streaming-<UTC time>.json``; the README explains
every field. This is a benchmark, not a test: it asserts nothing, it records.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from synthetic_checkpoint import layer_bytes  # noqa: E402

from slim.verify import read_header  # noqa: E402

MB = 1e6  # throughput in MB/s (10^6 bytes); memory in MiB
MiB = 2**20
IMPORTS = ("import torch, transformers, slim.main, slim.pipeline, slim.quantize, slim.export; "
           "from transformers.models.deepseek_v3 import modeling_deepseek_v3")
_LAYER_RE = re.compile(r"^(model\.layers\.\d+)\.")
_STAGE_RE = re.compile(r"stage (\S+)\s+([\d.]+) s\s+peak host RSS (\d+) MiB")


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS / RssAnon / RssFile of one process, in KiB (empty if it is gone)."""
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


class RssPoller:
    """Polls the RSS of a process and all its descendants (summed) every ``interval`` seconds."""

    def __init__(self, pid: int, interval: float = 0.05, limit_mib: float | None = None):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.limit_mib = limit_mib
        self.killed = False
        self.samples: list[tuple[float, float, float, float]] = []  # (t s, rss MiB, anon MiB, file MiB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._t0 = time.perf_counter()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            tot = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
            for p in procs:
                st = proc_status_kib(p.pid)
                for k in tot:
                    tot[k] += st.get(k, 0)
            self.samples.append((time.perf_counter() - self._t0, tot["VmRSS"] / 1024, tot["RssAnon"] / 1024,
                                 tot["RssFile"] / 1024))
            if self.limit_mib and tot["VmRSS"] / 1024 > self.limit_mib and not self.killed:
                self.killed = True  # a shared machine: stop the run before it takes everyone's memory
                for p in reversed(procs):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self, max_points: int = 120) -> dict:
        if not self.samples:
            return {}
        step = max(1, len(self.samples) // max_points)
        return {
            "peak_rss_mib": round(max(s[1] for s in self.samples), 1),
            "peak_anon_mib": round(max(s[2] for s in self.samples), 1),
            "peak_file_mib": round(max(s[3] for s in self.samples), 1),
            "samples": len(self.samples),
            "trace_t_rss_anon_file_mib": [[round(v, 2) for v in s] for s in self.samples[::step]],
        }


def monitored(cmd: list[str], env: dict, cwd: Path, log_path: Path, limit_mib: float | None = None) -> dict:
    """Run ``cmd`` under /usr/bin/time -v, polling RSS; return wall time, RSS figures, exit code.

    Over ``limit_mib`` of RSS the process tree is killed and the result says so. Where GNU time is not
    installed, the peak RSS is the poller's (``rss_source: poll``).
    """
    timer = ["/usr/bin/time", "-v"] if os.access("/usr/bin/time", os.X_OK) else []
    full = [*timer, *cmd]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(full, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        with RssPoller(proc.pid, limit_mib=limit_mib) as poller:
            rc = proc.wait()
    wall = time.perf_counter() - start
    text = log_path.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    poll = poller.summary()
    out = {"returncode": rc, "wall_s": round(wall, 3),
           "time_v_maxrss_mib": round(int(m.group(1)) / 1024, 1) if m else poll.get("peak_rss_mib"),
           "rss_source": "time -v" if m else "poll", "poll": poll}
    cpu = re.search(r"Percent of CPU this job got: (\d+)%", text)
    user = re.search(r"User time \(seconds\): ([\d.]+)", text)
    system = re.search(r"System time \(seconds\): ([\d.]+)", text)
    if cpu and user:  # the machines are shared: how much CPU the run actually got
        out["cpu_percent"], out["user_s"] = int(cpu.group(1)), float(user.group(1))
    if system:  # kernel time: page faults, and copying into the page cache (fresh pages are slow on some VMs)
        out["sys_s"] = float(system.group(1))
    stages = {name: {"s": float(s), "peak_rss_mib": int(r)} for name, s, r in _STAGE_RE.findall(text)}
    if stages:
        out["slim_log_stages"] = stages
    if poller.killed:
        out["killed_over_rss_limit_mib"] = limit_mib
        m = re.findall(r"quantize layers:\s+\d+%\|[^|]*\| (\d+)/(\d+)", text)
        if m:
            out["layers_done_when_killed"] = f"{m[-1][0]}/{m[-1][1]}"
    if rc != 0:
        out["log_tail"] = text[-3000:]
    return out


def dumps(report: dict) -> str:
    """Indented JSON with number lists (the RSS traces) kept on one line each."""
    text = json.dumps(report, indent=1)
    return re.sub(r"\[\s*(-?[\d.]+(?:,\s*-?[\d.]+)*)\s*\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text) + "\n"


def shard_files(ckpt: Path) -> list[Path]:
    return sorted(ckpt.glob("*.safetensors"))


def warm(files: list[Path]) -> float:
    """Read every file once (page cache warm for the copy and the slim runs); returns seconds."""
    t = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(16 << 20):
                pass
    return time.perf_counter() - t


def copy_baseline(files: list[Path], dest: Path, repeats: int) -> dict:
    """MB/s of ``shutil.copyfile`` of the same shards to a fresh directory (no fsync, like slim)."""
    nbytes = sum(f.stat().st_size for f in files)
    times = []
    for _ in range(repeats):
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()
        dest.mkdir(parents=True)
        t = time.perf_counter()
        for f in files:
            shutil.copyfile(f, dest / f.name)
        times.append(time.perf_counter() - t)
        shutil.rmtree(dest)
        os.sync()
    best = min(times)
    # the first copy writes into page-cache pages the machine had not just freed, as a slim run's output does;
    # later repeats reuse the pages the previous one freed. The target compares with the best.
    return {"bytes": nbytes, "seconds": [round(x, 3) for x in times], "best_s": round(best, 3),
            "mb_s": round(nbytes / best / MB, 1), "read_write_mb_s": round(2 * nbytes / best / MB, 1),
            "first_read_write_mb_s": round(2 * nbytes / times[0] / MB, 1)}


def slim_env(threads: int) -> dict:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", WANDB_SILENT="true", WANDB_MODE="disabled")
    return env


def git_head() -> dict:
    def git(*a):
        return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "subject": git("log", "-1", "--format=%s"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def parse_run(spec: str) -> tuple[str, tuple[int, int] | None]:
    """``SCHEME:off`` (calibration=none) or ``SCHEME:NxL`` (N samples of L tokens)."""
    scheme, _, calib = spec.partition(":")
    if not scheme or not calib:
        raise SystemExit(f"--runs takes SCHEME:off or SCHEME:NUM_SAMPLESxSEQ_LEN, got {spec!r}")
    return scheme, None if calib == "off" else tuple(int(x) for x in calib.split("x"))


def calib_label(calibration: dict | None) -> str:
    return "off" if calibration is None else f"{calibration['num_samples']}x{calibration['seq_len']}"


def bytes_per_layer(ckpt: Path) -> dict[str, int]:
    """Bytes of each decoder layer's tensors in a checkpoint's shards (from their headers), keyed by prefix."""
    out: dict[str, int] = {}
    for f in shard_files(ckpt):
        header, _ = read_header(f)
        for name, info in header.items():
            m = _LAYER_RE.match(name)
            if m:
                a, b = info["data_offsets"]
                out[m.group(1)] = out.get(m.group(1), 0) + b - a
    return out


def layer_loop(layer_seconds: dict[str, float], bytes_in: dict[str, int], bytes_out: dict[str, int]) -> dict:
    """The decoder layers' own rate: their bytes read + written over the seconds slim logged for them (startup,
    embedding, head and finalize excluded), over all of them and without the first (which also loads the
    kernels and is a dense layer in DeepSeek)."""
    def rate(names):
        moved = sum(bytes_in.get(n, 0) + bytes_out.get(n, 0) for n in names)
        secs = sum(layer_seconds[n] for n in names)
        return {"layers": len(names), "seconds": round(secs, 3), "bytes": moved,
                "read_write_mb_s": round(moved / secs / MB, 1) if secs > 0 else None}

    names = sorted(layer_seconds, key=lambda n: int(n.rsplit(".", 1)[1]))
    return {"all": rate(names), "after_first": rate(names[1:]) if len(names) > 1 else None,
            "seconds_per_layer": [layer_seconds[n] for n in names]}


def run_slim(ckpt: Path, run_dir: Path, scheme: str, calib: tuple[int, int] | None, env: dict, threads: int,
             limit_mib: float | None = None, hardware: str = "cpu") -> dict:
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    calibration = ["calibration=none"] if calib is None else \
        [f"calibration.num_samples={calib[0]}", f"calibration.seq_len={calib[1]}"]
    overrides = [f"model.path={ckpt}", "eval=none", "logger=none", f"scheme={scheme}", *calibration,
                 f"hardware={hardware}", f"hardware.threads={threads}", f"hydra.run.dir={run_dir}"]
    cmd = [sys.executable, "-m", "slim.main", *overrides]
    res = {"command": "python -m slim.main " + " ".join(overrides), "scheme": scheme,
           "calibration": None if calib is None else {"num_samples": calib[0], "seq_len": calib[1]}}
    res.update(monitored(cmd, env, run_dir.parent, run_dir.parent / f"{run_dir.name}.log", limit_mib))
    if res["returncode"] != 0:
        return res
    results = json.loads((run_dir / "results.json").read_text())
    bytes_in = sum(f.stat().st_size for f in shard_files(ckpt))
    bytes_out = sum(f.stat().st_size for f in shard_files(run_dir / "checkpoint"))
    t_q = results["timings_s"]["quantize"]
    res.update(
        timings_s=results["timings_s"], slim_peak_memory=results["peak_memory"],
        checkpoint_bytes_in=bytes_in, checkpoint_bytes_out=bytes_out,
        quantize_read_write_mb_s=round((bytes_in + bytes_out) / t_q / MB, 1),
        quantize_read_mb_s=round(bytes_in / t_q / MB, 1),
        fallback_expert_projections=len(results["quantization"]["fallbacks"]),
    )
    quantize = json.loads((run_dir / "quantize.json").read_text())
    if quantize.get("layer_seconds"):
        res["layer_loop"] = layer_loop(quantize["layer_seconds"], bytes_per_layer(ckpt),
                                       bytes_per_layer(run_dir / "checkpoint"))
    res["peak_rss_mib"] = res["time_v_maxrss_mib"]
    shutil.rmtree(run_dir / "checkpoint")  # disk: only the figures are kept
    os.sync()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    p.add_argument("--runs", nargs="+", default=["w4a8_dynamic:off", "fp8_static:1x16", "w4a8:1x16", "fp8_static:4x64"],
                   help="SCHEME:off (calibration=none: the throughput target's runs) or SCHEME:NUM_SAMPLESxSEQ_LEN")
    p.add_argument("--hidden-size", type=int, default=1024)
    p.add_argument("--moe-intermediate-size", type=int, default=512)
    p.add_argument("--n-routed-experts", type=int, default=32)
    p.add_argument("--num-attention-heads", type=int, default=16)
    p.add_argument("--q-lora-rank", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads of the slim process")
    p.add_argument("--hardware", default="cpu",
                   help="slim's hardware preset; on a GPU machine h20x1_lowmem measures the device path (FP8 "
                        "decoded and quantized on the GPU)")
    p.add_argument("--slim-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment of the slim runs, e.g. MALLOC_MMAP_THRESHOLD_=131072 (recorded)")
    p.add_argument("--max-rss-gib", type=float, default=8.0, help="kill a slim run whose RSS passes this (shared machines)")
    p.add_argument("--copy-repeats", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/slim-bench"))
    p.add_argument("--out", type=Path, help="result JSON (default experiments/bench/results/streaming-<UTC>.json)")
    p.add_argument("--keep", action="store_true", help="keep the synthetic checkpoints")
    p.add_argument("--reuse", action="store_true",
                   help="use a synthetic checkpoint kept in --workdir by an earlier --keep run (same width and seed)")
    p.add_argument("--summarize", type=Path, metavar="RESULT_JSON", help="print a result file as a markdown table")
    args = p.parse_args(argv)
    if args.summarize:
        print(markdown_table(json.loads(args.summarize.read_text())))
        return 0

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out_path = args.out or HERE / "results" / f"streaming-{stamp}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    args.workdir.mkdir(parents=True, exist_ok=True)
    env = slim_env(args.threads)
    slim_extra_env = dict(kv.split("=", 1) for kv in args.slim_env)
    env.update(slim_extra_env)
    matrix = [parse_run(spec) for spec in args.runs]
    width = {"hidden_size": args.hidden_size, "moe_intermediate_size": args.moe_intermediate_size,
             "n_routed_experts": args.n_routed_experts}
    extra = {"num_attention_heads": args.num_attention_heads, "q_lora_rank": args.q_lora_rank}
    report: dict = {
        "benchmark": "streaming", "utc": stamp, "git": git_head(),
        "machine": {"cpus": os.cpu_count(), "mem_total_gib": round(psutil.virtual_memory().total / 2**30, 1),
                    "loadavg_start": os.getloadavg(), "python": platform.python_version(), "threads": args.threads,
                    "hardware": args.hardware,
                    "slim_env": slim_extra_env},
        "synthetic": {**width, **extra, "seed": args.seed},
        "notes": ["throughput target: the calibration=none runs (calibration off); runs with calibration show "
                  "memory with calibration hidden states and the cost of the forward passes"],
    }

    def save():
        out_path.write_text(dumps(report))

    imports = IMPORTS
    if args.hardware != "cpu":  # the CUDA context and cuBLAS's host memory are runtime overhead on a GPU too
        imports += "; import torch; x = torch.ones(64, 64, device='cuda', dtype=torch.bfloat16); (x @ x).sum().item()"
    print(f"fixed runtime overhead: {imports}", flush=True)
    report["runtime_overhead"] = monitored([sys.executable, "-c", imports], env, args.workdir,
                                           args.workdir / "imports.log")
    report["runtime_overhead"].pop("poll", None)
    report["depths"] = {}
    for n in args.layers:
        ckpt = args.workdir / f"ds{n}"
        gen_cmd = [sys.executable, str(HERE / "synthetic_checkpoint.py"), "--num-layers", str(n), "--out", str(ckpt),
                   "--hidden-size", str(args.hidden_size), "--moe-intermediate-size", str(args.moe_intermediate_size),
                   "--n-routed-experts", str(args.n_routed_experts), "--seed", str(args.seed),
                   *[a for k, v in extra.items() for a in ("--set", f"{k}={v}")]]
        if args.reuse and (ckpt / "config.json").is_file() and (ckpt / "synthetic_command.json").is_file() \
                and json.loads((ckpt / "synthetic_command.json").read_text()) == gen_cmd[2:]:
            print(f"[{n} layers] reusing {ckpt}", flush=True)
            gen = {"reused": True}
        else:
            shutil.rmtree(ckpt, ignore_errors=True)
            print(f"[{n} layers] generating {ckpt}", flush=True)
            gen = monitored(gen_cmd, env, args.workdir, args.workdir / f"gen{n}.log")
            gen.pop("poll", None)
            if gen["returncode"] != 0:
                raise SystemExit(f"generator failed: {gen['log_tail']}")
            (ckpt / "synthetic_command.json").write_text(json.dumps(gen_cmd[2:]))
        config = json.loads((ckpt / "config.json").read_text())
        lb = layer_bytes(config)
        files = shard_files(ckpt)
        depth = report["depths"][str(n)] = {
            "num_layers": n, "generator": gen, "shards": len(files),
            "checkpoint_bytes": sum(f.stat().st_size for f in files),
            "largest_layer_bf16_bytes": max(lb.values()), "largest_layer_bf16_mib": round(max(lb.values()) / MiB, 1),
            "warm_read_s": round(warm(files), 3),
        }
        print(f"[{n} layers] {depth['checkpoint_bytes'] / MiB:.0f} MiB in {len(files)} shards; copy baseline", flush=True)
        depth["copy"] = copy_baseline(files, args.workdir / "copy", args.copy_repeats)
        depth["runs"] = []
        save()
        for scheme, calib in matrix:
            label = "off" if calib is None else f"{calib[0]}x{calib[1]}"
            print(f"[{n} layers] slim {scheme} calibration {label}", flush=True)
            warm(files)
            r = run_slim(ckpt, args.workdir / f"run{n}_{scheme}_{label}", scheme, calib, env, args.threads,
                         args.max_rss_gib * 1024, args.hardware)
            if r["returncode"] == 0:
                copy = depth["copy"]["read_write_mb_s"]
                r["throughput_vs_copy"] = round(r["quantize_read_write_mb_s"] / copy, 3)
                loop = r.get("layer_loop", {}).get("all") or {}
                if loop.get("read_write_mb_s"):
                    r["layer_loop_vs_copy"] = round(loop["read_write_mb_s"] / copy, 3)
                print(f"   wall {r['wall_s']:.1f} s, peak RSS {r['peak_rss_mib']:.0f} MiB, quantize "
                      f"{r['quantize_read_write_mb_s']:.0f} MB/s r+w ({r['throughput_vs_copy']:.0%} of copy); "
                      f"decoder layers {loop.get('read_write_mb_s') or 0:.0f} MB/s r+w "
                      f"({r.get('layer_loop_vs_copy', 0):.0%})", flush=True)
            else:
                print(f"   FAILED rc={r['returncode']} {r.get('killed_over_rss_limit_mib', '')}: "
                      f"{r.get('log_tail', '')[-800:]}", flush=True)
                shutil.rmtree(args.workdir / f"run{n}_{scheme}_{label}", ignore_errors=True)
            depth["runs"].append(r)
            save()
        if not args.keep:
            shutil.rmtree(ckpt)
    report["machine"]["loadavg_end"] = os.getloadavg()
    report["targets"] = check_targets(report, args.layers)
    save()
    print(json.dumps(report["targets"], indent=1))
    print(f"results: {out_path}")
    return 0


def check_targets(report: dict, layers: list[int]) -> dict:
    """The three targets of the streaming issue, per scheme and calibration setting, from the figures above."""
    if len(layers) < 2:
        return {}
    small, big = str(min(layers)), str(max(layers))
    overhead = report["runtime_overhead"]["time_v_maxrss_mib"]
    out = {}
    for rb in report["depths"][big]["runs"]:
        key = f"{rb['scheme']} {calib_label(rb['calibration'])}"
        rs = next((r for r in report["depths"][small]["runs"]
                   if (r["scheme"], r["calibration"]) == (rb["scheme"], rb["calibration"])), None)
        if rb["returncode"] != 0 or rs is None or rs["returncode"] != 0:
            out[key] = {"error": "a run failed"}
            continue
        layer = report["depths"][big]["largest_layer_bf16_mib"]
        bound = 3 * layer + overhead
        out[key] = {
            "rss_ratio_deep_vs_shallow": round(rb["peak_rss_mib"] / rs["peak_rss_mib"], 3),
            "rss_ratio_target": 1.15,
            f"peak_rss_{big}_layers_mib": rb["peak_rss_mib"],
            "rss_bound_mib (3 x largest layer + overhead)": round(bound, 1),
            "rss_vs_bound": round(rb["peak_rss_mib"] / bound, 3),
        }
        if rb["calibration"] is None:  # the throughput target is for calibration off
            out[key].update(throughput_vs_copy=rb["throughput_vs_copy"], throughput_target=0.30,
                            layer_loop_vs_copy=rb.get("layer_loop_vs_copy"))
            # per added layer: the startup both depths pay (imports, CUDA context, head and tail) cancels out,
            # which is what a 61-layer checkpoint of 640 GB sees
            moved = sum(rb[k] - rs[k] for k in ("checkpoint_bytes_in", "checkpoint_bytes_out"))
            extra_s = rb["timings_s"]["quantize"] - rs["timings_s"]["quantize"]
            if extra_s > 0:
                per_layer = moved / extra_s / MB
                out[key].update(per_layer_read_write_mb_s=round(per_layer, 1),
                                per_layer_vs_copy=round(per_layer / report["depths"][big]["copy"]["read_write_mb_s"], 3))
    return out


def loop_figure(run: dict) -> str:
    loop = (run.get("layer_loop") or {}).get("all") or {}
    if not loop.get("read_write_mb_s"):
        return "- | -"
    return f"{loop['read_write_mb_s']:.0f} | {run['layer_loop_vs_copy']:.1%}"


def markdown_table(report: dict) -> str:
    """One row per run: depth, scheme, calibration, wall, peak RSS (anon/file), throughput vs copy."""
    overhead = report["runtime_overhead"]["time_v_maxrss_mib"]
    lines = [f"commit `{report['git']['commit'][:8]}` ({report['git']['subject'][:60]}), "
             f"{report['synthetic']['hidden_size']} hidden, {report['synthetic']['n_routed_experts']} experts x "
             f"{report['synthetic']['moe_intermediate_size']}, {report['machine']['threads']} thread(s), "
             f"env {report['machine'].get('slim_env') or '-'}; runtime overhead {overhead:.0f} MiB",
             "",
             "| layers | checkpoint | largest layer (bf16) | scheme | calib | wall s | peak RSS MiB | anon / file MiB "
             "| quantize r+w MB/s | copy r+w MB/s | vs copy | decoder layers r+w MB/s | vs copy |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, d in report["depths"].items():
        for r in d["runs"]:
            calib = calib_label(r["calibration"])
            head = (f"| {n} | {d['checkpoint_bytes'] / MiB:.0f} MiB | {d['largest_layer_bf16_mib']:.0f} MiB "
                    f"| {r['scheme']} | {calib} ")
            poll = r.get("poll", {})
            if r["returncode"] != 0:
                what = (f"killed at {r['killed_over_rss_limit_mib']:.0f} MiB after layer {r.get('layers_done_when_killed')}"
                        if r.get("killed_over_rss_limit_mib") else f"failed rc={r['returncode']}")
                lines.append(head + f"| {r['wall_s']:.0f} | > {poll.get('peak_rss_mib', 0):.0f} | {what} | | | | | |")
                continue
            lines.append(head + f"| {r['wall_s']:.0f} | {r['peak_rss_mib']:.0f} | {poll.get('peak_anon_mib', 0):.0f} / "
                         f"{poll.get('peak_file_mib', 0):.0f} | {r['quantize_read_write_mb_s']:.0f} "
                         f"| {d['copy']['read_write_mb_s']:.0f} | {r['throughput_vs_copy']:.1%} "
                         f"| {loop_figure(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
