"""The stages of a slim run, in order: load -> quantize (calibrate + export) -> evaluate -> track."""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slim import __version__, collector, kernels
from slim.cache import cache_dir
from slim.config import SlimConfig, validate
from slim.distributed import Dist, init_distributed, shutdown
from slim.errors import SlimError
from slim.hostmem import no_gemm_kernel_cache
from slim.tracking import Tracker, flat_metrics, metric_deltas, peak_memory, results_table, write_results

log = logging.getLogger(__name__)


class Stages:
    """Wall seconds per stage, with a log line each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %-15s %7.1f s   peak host RSS %.0f MiB", name, self.seconds[name], peak_memory()["host_rss_mib"])


def prepare_source(cfg: SlimConfig) -> Path:
    """The checkpoint to read; converts ``model.convert_from`` (FP8) into ``model.path`` (bf16) once if needed."""
    path = Path(cfg.model.path)
    if not path.exists() and cfg.model.convert_from:
        from slim.models.convert import convert_fp8_to_bf16

        log.info("converting %s to bf16 into %s (once)", cfg.model.convert_from, path)
        convert_fp8_to_bf16(cfg.model.convert_from, path)
    if not (path / "config.json").is_file():
        raise SlimError(f"model.path={path} is not a checkpoint directory (no config.json); set model.path")
    return path


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def run_fingerprint(cfg: SlimConfig, world: int) -> str:
    """What the exported bytes depend on: the source checkpoint, slim's version and every setting that matters.

    A finished checkpoint or an interrupted export is reused only by a run with the same fingerprint.
    """
    src = Path(cfg.model.path)
    if not (src / "config.json").is_file() and cfg.model.convert_from:
        src = Path(cfg.model.convert_from)
    config_file = src / "config.json"
    payload = {
        "slim": __version__,
        "source": str(src.resolve()),
        "source_config": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else None,
        "source_files": sorted((p.name, p.stat().st_size) for p in src.glob("*.safetensors")),
        "model": {k: getattr(cfg.model, k) for k in ("load_type", "dtype", "copy_mtp", "convert_from")},
        "scheme": dataclasses.asdict(cfg.scheme),
        "calibration": dataclasses.asdict(cfg.calibration),
        "max_shard_mb": cfg.export.max_shard_mb,
        "checksum": cfg.export.checksum,
        "world": world,
        "device": cfg.hardware.device,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def quantize_stage(cfg: SlimConfig, source: Path, out_dir: Path, tokenizer, dist: Dist | None = None,
                   fingerprint: str = "") -> dict[str, Any]:
    """Stream, calibrate, quantize and export; with several ranks each runs its slice of the samples.

    With ``export.resume`` it saves commit points and continues from the last one when the run dir has one.
    """
    from slim.calibration.data import calibration_tokens, check_seq_len
    from slim.export import CheckpointWriter
    from slim.formats import FORMATS
    from slim.hostmem import keep_temporaries_in_heap
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.checkpoint import CheckpointReader
    from slim.models.loading import DTYPES
    from slim.quant.schemes import SCHEMES
    from slim.plan import GiB, plan_memory
    from slim.quantize import kernel_path, quantize_model
    from slim.resume import ResumeStore
    from slim.targets import select_targets

    dist = dist or Dist(device=torch.device(cfg.hardware.device))
    store = ResumeStore(out_dir, dist.rank, fingerprint) if cfg.export.resume else None
    commit = store.commit_record() if store else None
    if commit and commit["fingerprint"] != fingerprint:  # another configuration's: not ours to continue
        commit = None
    if commit and commit["stage"] == "written":  # everything was written before the interruption
        log.info("every tensor was already written (commit in %s); finalizing", store.dir)
        return _finish_export(store.load_written(), out_dir, source, store, dist)

    reader = CheckpointReader(source, load_type=cfg.model.load_type)
    reader.check_load_type()
    src_config = reader.config()
    model, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
    adapter.open_reader(reader, model.config)
    selection = select_targets(model, cfg.scheme.ignore_layers)
    calibrate = cfg.calibration.source != "none"
    if calibrate:
        check_seq_len(cfg.calibration, getattr(model.config, "max_position_embeddings", None))
    plan = plan_memory(cfg, model, adapter, selection.ignored)
    log.info("memory plan: %.2f GiB per device, %.2f GiB host per rank, checkpoint %.2f GiB",
             plan.device_total / GiB, plan.host_total / GiB, plan.checkpoint_bytes / GiB)
    if not plan.feasible:
        raise SlimError(f"this run does not fit hardware={cfg.hardware.name}: " + "; ".join(plan.problems)
                        + " (python -m slim.main mode=plan ... prints the breakdown)")
    if calibrate:
        ids = calibration_tokens(cfg.calibration, tokenizer, getattr(model.config, "max_position_embeddings", None))
        if ids.shape[0] < dist.world:
            raise SlimError(f"{ids.shape[0]} calibration samples cannot be split over {dist.world} ranks; "
                            f"raise calibration.num_samples to at least {dist.world}")
    else:
        ids = None
        log.info("calibration off (calibration=none): weights only, no forward pass; activations are "
                 "quantized per token at run time")
    scheme = SCHEMES[cfg.scheme.name]
    fmt = FORMATS[cfg.scheme.format]  # a known name: validate checked it
    # calibration off on a CPU with the kernels: they do the work, torch only small ops (see torch_single_threaded)
    on_kernels = kernel_path(ids is not None, dist.device.type)
    # ... from block FP8: the weights go from the mapped codes to int4 on the kernels' own threads, and this thread
    # writes; elsewhere a writer thread writes while this one quantizes
    streamed = on_kernels and reader.is_block_fp8
    writer = CheckpointWriter(out_dir, max_shard_bytes=cfg.export.max_shard_mb << 20,
                              tag=f"rank{dist.rank:03d}-" if dist.world > 1 else "", direct_io=cfg.export.direct_io,
                              background=not streamed, algorithm=cfg.export.checksum,
                              max_queued_bytes=plan.write_queue_bytes)
    hidden_device = dist.device if plan.hidden_states_on == "device" else torch.device("cpu")
    start = store.load_layer(commit["layer"], hidden_device) if commit else None
    if dist.device.type == "cpu":  # the block-wise weight path's temporaries (a GPU's live on the GPU)
        keep_temporaries_in_heap()
    try:
        with kernels.torch_single_threaded() if on_kernels else contextlib.nullcontext(), \
                collector.long_lived_frozen():  # the skeleton and imports: out of the collector's walks
            result = quantize_model(model=model, adapter=adapter, reader=reader, writer=writer, fmt=fmt,
                                    scheme=scheme, input_ids=None if ids is None else dist.shard(ids), cfg=cfg,
                                    device=dist.device, selection=selection, dist=dist, store=store, start=start,
                                    hidden_device=hidden_device)
    except BaseException as exc:
        writer.abandon()  # close the open shard file; the last commit point still describes it
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SlimError(f"writing the checkpoint into {out_dir} failed: {exc.strerror}; free some space and "
                            "rerun the same command to resume from the last complete layer") from exc
        raise
    result.num_samples = 0 if ids is None else int(ids.shape[0])
    shards = [shard for part in dist.gather(writer.close()) for shard in part]  # rank order
    checksums = {k: v for part in dist.gather(writer.checksums) for k, v in part.items()}
    config = {k: v for k, v in src_config.items() if k != "quantization_config"}
    config["torch_dtype"] = config["dtype"] = cfg.model.dtype
    config["quantization_config"] = fmt.quantization_config(
        scheme.name, result.ignored, cfg.scheme.group_size, not scheme.static_activations
    )
    config["slim"] = {
        "version": __version__,
        "fingerprint": fingerprint,
        "scheme": scheme.name,
        "group_size": cfg.scheme.group_size,
        "ignore_layers": list(cfg.scheme.ignore_layers),
        "weight_observer": cfg.scheme.weight_observer,
        "source": str(source),
        "source_load_type": cfg.model.load_type,
        "calibration": None if ids is None else {
            "name": cfg.calibration.name,
            "num_samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "route_all_experts": cfg.calibration.route_all_experts,
        },
        "fallback_input_scales": result.fallbacks,
    }
    summary = result.to_dict() | {"checkpoint_bytes": sum(nbytes for _, _, nbytes in shards)}
    written = {"shards": shards, "checksums": checksums, "algorithm": writer.algorithm, "config": config,
               "result": summary}
    if store is not None and dist.is_main:
        store.commit_written(written)
    return _finish_export(written, out_dir, source, store, dist)


def _finish_export(written: dict[str, Any], out_dir: Path, source: Path, store, dist: Dist) -> dict[str, Any]:
    """Rank 0 names the shards and writes manifest, index and config last (every rank has closed its shards)."""
    from slim.export import finalize_checkpoint

    dist.barrier()
    if dist.is_main:
        finalize_checkpoint(out_dir, written["shards"], written["config"], source, written["checksums"],
                            written["algorithm"])
        atomic_json(out_dir.parent / QUANTIZE_RECORD, written["result"])
        if store is not None:
            store.clear()
    return written["result"]


def eval_stage(cfg: SlimConfig, path: Path, load_type: str, tokenizer, workdir: Path) -> dict:
    """Score a checkpoint directory with the configured backend (slim.evaluate.BACKENDS) and numerics."""
    from slim.evaluate import evaluate_checkpoint, model_settings

    return evaluate_checkpoint(path, cfg.eval, workdir, tokenizer=tokenizer,
                               model=model_settings(cfg, path, load_type))


def checkpoint_numerics(eval_cfg, path: Path) -> str:
    from slim.evaluate import numerics_for

    return numerics_for(eval_cfg, path)


def plan_stage(cfg: SlimConfig) -> dict[str, Any]:
    """mode=plan: size the run from config.json alone; exit non-zero (SlimError) when it does not fit."""
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.loading import DTYPES
    from slim.plan import plan_memory
    from slim.targets import select_targets

    from slim.plan_eval import eval_plan, vllm_layouts, vllm_refused_tp

    path = plan_config_path(cfg)
    model, adapter = build_skeleton(load_config(str(path), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
    selection = select_targets(model, cfg.scheme.ignore_layers)
    plan = plan_memory(cfg, model, adapter, selection.ignored)
    print(plan.table())
    ev, hidden_on, ev_problems, notes = eval_plan(cfg, model, adapter)
    plan.problems.extend(ev_problems)
    gpus = cfg.hardware.nodes * cfg.hardware.procs_per_node if cfg.hardware.device != "cpu" else 0
    layouts, refused = vllm_layouts(model.config, cfg.scheme.name, gpus), vllm_refused_tp(model.config, cfg.scheme.name, gpus)
    if ev:
        print(f"evaluation (eval.backend={cfg.eval.backend}), per rank: " + ", ".join(
            f"{k} {v / 2**30:.2f} GiB" for k, v in ev.items()))
    for line in notes + [f"vLLM serves it with: {lay}" for lay in layouts] + (
            [f"vLLM refuses tensor-parallel {', '.join(map(str, refused))} for {cfg.scheme.name}"] if refused else []) + (
            [f"no vLLM layout serves {cfg.scheme.name} (static W4A8): SGLang / TensorRT-LLM do"] if gpus and not layouts else []):
        print(line)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"slim_version": __version__, "mode": "plan", "model": cfg.model.name, "scheme": cfg.scheme.name,
               "plan": plan.to_dict() | {"config": str(path)},
               "eval_plan": {"backend": cfg.eval.backend, "bytes": ev, "hidden_states_on": hidden_on,
                             "feasible": not ev_problems, "problems": ev_problems, "notes": notes},
               "vllm_layouts": layouts, "vllm_refused_tensor_parallel": refused}
    write_results(run_dir, results)
    if not plan.feasible:
        raise SlimError("the run does not fit: " + "; ".join(plan.problems))
    return results


def plan_config_path(cfg: SlimConfig) -> Path:
    """model.path, or the preset's shipped config.json when the weights are not there yet (said in the log)."""
    from slim.config import ASSETS

    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        return path
    shipped = ASSETS / "configs" / (cfg.model.shipped_config or "") / "config.json"
    if cfg.model.shipped_config and shipped.is_file():
        print(f"model.path={path} has no config.json: planning with the shipped {shipped}")
        return shipped.parent
    raise SlimError(f"model.path={path} has no config.json; mode=plan needs only that file")


def return_freed_memory_to_os() -> None:
    """glibc keeps freed heap blocks for reuse; layer-sized tensors allocated and freed over and over then
    show up as RSS that grows with depth. Serving allocations above 128 KiB with mmap hands them back to the
    OS on free (the same as ``MALLOC_MMAP_THRESHOLD_=131072``); elsewhere this does nothing."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_mmap_threshold = -3  # from malloc.h
    libc.mallopt(m_mmap_threshold, 128 << 10)


def run(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Run the configured job in this process (one rank of it under torchrun); returns results.json's content."""
    validate(cfg)
    if cfg.mode == "plan":
        return plan_stage(cfg)
    kernels.configure(cfg.hardware.cpu_kernels)
    no_gemm_kernel_cache()
    if cfg.mode == "sensitivity":
        from slim.sensitivity import sensitivity_stage

        return sensitivity_stage(cfg, resolved)
    return_freed_memory_to_os()
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.hardware)
    try:
        return _run_job(cfg, resolved, dist)
    finally:
        shutdown()


QUANTIZE_RECORD = "quantize.json"


def atomic_json(path: Path, obj: Any) -> None:
    from slim.export import atomic_write_text

    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def prepare_output(cfg: SlimConfig, out_dir: Path, fingerprint: str, dist: Dist) -> bool:
    """Decide what to do with what the run dir already holds. True: its checkpoint is finished and is this run's.

    A finished checkpoint of other settings is never replaced unless ``overwrite=true``; an interrupted export
    of these settings is resumed (``export.resume``), one of other settings is refused like a finished one.
    """
    from slim.resume import ResumeStore

    reusable = False
    if dist.is_main:
        run_dir, store = Path(cfg.run_dir), ResumeStore(out_dir, 0, fingerprint)
        record = run_dir / QUANTIZE_RECORD
        commit = store.commit_record()
        if (out_dir / "config.json").is_file():
            previous = json.loads((out_dir / "config.json").read_text()).get("slim", {}).get("fingerprint")
            if not cfg.overwrite and (previous != fingerprint or not record.is_file()):
                raise SlimError(f"{out_dir} already holds a finished checkpoint of other settings; "
                                "choose another hydra.run.dir or set overwrite=true to replace it")
            reusable = not cfg.overwrite
        elif commit and commit["fingerprint"] != fingerprint and not cfg.overwrite:
            raise SlimError(f"{run_dir} holds an interrupted export of other settings; rerun with the same settings "
                            "to resume it, or set overwrite=true to start over")
        if reusable:
            log.info("%s is already complete for these settings; skipping the quantize stage", out_dir)
        elif commit and commit["fingerprint"] == fingerprint and cfg.export.resume and not cfg.overwrite:
            log.info("resuming the interrupted export in %s", out_dir)
        else:  # nothing usable: start from scratch
            shutil.rmtree(out_dir, ignore_errors=True)
            store.clear()
            record.unlink(missing_ok=True)
    return bool(dist.gather(reusable)[0])


def _baseline_key(cfg: SlimConfig, source: Path) -> str:
    """The unquantized model's scores depend on the source weights, compute settings, eval settings and tasks."""
    import lm_eval

    from slim.evaluate import TASKS_DIR

    task_files = sorted(TASKS_DIR.glob("*.yaml")) + sorted((TASKS_DIR.parent / "data").glob("*.jsonl"))
    payload = {
        "slim": __version__, "lm_eval": getattr(lm_eval, "__version__", "?"),
        "source": str(source.resolve()),
        "source_files": sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.glob("*.safetensors")),
        "model": {k: getattr(cfg.model, k) for k in ("load_type", "dtype")}, "device": cfg.hardware.device,
        "eval": {k: v for k, v in dataclasses.asdict(cfg.eval).items() if k not in ("name", "baseline", "cache_baseline")},
        "tasks": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in task_files},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def baseline_metrics(cfg: SlimConfig, source: Path, tokenizer, run_dir: Path) -> tuple[dict, bool]:
    """The unquantized model's scores, computed once per model and eval settings and reused (``eval.cache_baseline``)."""
    path = cache_dir() / "baselines" / f"{_baseline_key(cfg, source)}.json"
    if cfg.eval.cache_baseline and path.is_file():
        log.info("baseline scores reused from %s", path)
        return json.loads(path.read_text())["metrics"], True
    metrics = eval_stage(cfg, source, cfg.model.load_type, tokenizer, run_dir)
    if cfg.eval.cache_baseline:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_json(path, {"model": str(source), "eval": dataclasses.asdict(cfg.eval), "metrics": metrics})
    return metrics, False


def _previous_results(run_dir: Path, fingerprint: str, eval_key: str) -> dict[str, Any]:
    """Metrics of an earlier attempt of this very run (same settings), so a rerun skips finished stages."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    prev = json.loads(path.read_text())
    same = prev.get("fingerprint") == fingerprint and prev.get("eval_key") == eval_key
    return prev.get("metrics", {}) if same else {}


def _run_job(cfg: SlimConfig, resolved: dict[str, Any], dist: Dist) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "checkpoint"
    fingerprint = run_fingerprint(cfg, dist.world)
    eval_key = hashlib.sha256(json.dumps(dataclasses.asdict(cfg.eval), sort_keys=True).encode()).hexdigest()[:16]
    done = prepare_output(cfg, out_dir, fingerprint, dist) if cfg.mode == "quantize" else False
    previous = _previous_results(run_dir, fingerprint, eval_key) if dist.is_main and not cfg.overwrite else {}

    stages = Stages()
    results: dict[str, Any] = {"slim_version": __version__, "mode": cfg.mode, "model": cfg.model.name,
                               "scheme": cfg.scheme.name, "run_dir": str(run_dir), "world_size": dist.world,
                               "fingerprint": fingerprint, "eval_key": eval_key, "metrics": {}}
    logger = cfg.logger if dist.is_main else dataclasses.replace(cfg.logger, mode="disabled")
    tracker = Tracker(logger, run_dir, resolved, name=f"{cfg.model.name}-{cfg.scheme.name}")
    exit_code = 1
    try:
        with stages("load"):
            source = prepare_source(cfg) if dist.is_main else Path(cfg.model.path)
            dist.barrier()  # the bf16 conversion (if any) is done once, by rank 0
            tokenizer = _load_tokenizer(source, cfg.model.trust_remote_code)
        if cfg.mode == "quantize":
            if done:
                qres = json.loads((run_dir / QUANTIZE_RECORD).read_text())
                results["skipped_stages"] = ["quantize"]
            else:
                with stages("quantize"):
                    qres = quantize_stage(cfg, source, out_dir, tokenizer, dist, fingerprint)
            results["checkpoint"] = str(out_dir)
            results["checkpoint_bytes"] = qres["checkpoint_bytes"]
            results["quantization"] = {k: qres[k] for k in ("ignored", "fallbacks", "skipped_prefixes", "num_samples")}
            if not dist.is_main:  # evaluation and records belong to rank 0
                exit_code = 0
                return results
            tracker.modules(qres["modules"])
            (run_dir / "modules.json").write_text(json.dumps(qres["modules"], indent=1) + "\n")
        elif not dist.is_main:
            exit_code = 0
            return results
        if cfg.eval.tasks:
            todo = []
            if cfg.mode == "quantize" and cfg.eval.baseline:
                todo.append(("baseline", source))
            todo.append(("quantized", out_dir) if cfg.mode == "quantize" else ("model", source))
            for which, target in todo:
                if which in previous:  # an earlier attempt of this run finished it
                    log.info("eval_%s already done in %s; skipping it", which, run_dir / "results.json")
                    results["metrics"][which] = previous[which]
                    results.setdefault("skipped_stages", []).append(f"eval_{which}")
                    continue
                with stages(f"eval_{which}"):
                    if which == "baseline":
                        results["metrics"][which], results["baseline_cached"] = baseline_metrics(
                            cfg, source, tokenizer, run_dir)
                    else:
                        results["metrics"][which] = eval_stage(cfg, target, cfg.model.load_type, tokenizer, run_dir)
                results.setdefault("eval", {"backend": cfg.eval.backend, "numerics": {}})["numerics"][which] = \
                    checkpoint_numerics(cfg.eval, target)
                write_results(run_dir, results)  # a later failure keeps this stage's scores
        if "baseline" in results["metrics"] and "quantized" in results["metrics"]:
            results["delta"] = metric_deltas(results["metrics"]["baseline"], results["metrics"]["quantized"])
        results["timings_s"] = stages.seconds
        results["peak_memory"] = peak_memory()
        write_results(run_dir, results)
        tracker.log(flat_metrics(results["metrics"]))
        tracker.summary({"checkpoint_bytes": results.get("checkpoint_bytes"), **{f"time/{k}": v for k, v in stages.seconds.items()},
                         **{f"memory/{k}": v for k, v in results["peak_memory"].items()}})
        if results["metrics"]:
            print(results_table(results["metrics"]))
        print(f"results: {run_dir / 'results.json'}" + (f"\ncheckpoint: {out_dir}" if "checkpoint" in results else ""))
        exit_code = 0
        return results
    finally:
        tracker.finish(exit_code)
