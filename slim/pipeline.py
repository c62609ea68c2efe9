"""The stages of a slim run, in order: load -> quantize (calibrate + export) -> evaluate -> track."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import logging
import time
from pathlib import Path
from typing import Any

import torch

from slim import __version__
from slim.config import SlimConfig, validate
from slim.distributed import Dist, init_distributed, shutdown
from slim.errors import SlimError
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


def quantize_stage(cfg: SlimConfig, source: Path, out_dir: Path, tokenizer, dist: Dist | None = None) -> dict[str, Any]:
    """Stream, calibrate, quantize and export; with several ranks each runs its slice of the samples."""
    from slim.calibration.data import calibration_tokens
    from slim.export import CheckpointWriter, finalize_checkpoint
    from slim.formats import FORMATS
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.checkpoint import CheckpointReader
    from slim.models.loading import DTYPES
    from slim.quant.schemes import SCHEMES
    from slim.plan import GiB, plan_memory
    from slim.quantize import quantize_model
    from slim.targets import select_targets

    reader = CheckpointReader(source, load_type=cfg.model.load_type)
    reader.check_load_type()
    src_config = reader.config()
    model, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
    adapter.open_reader(reader, model.config)
    selection = select_targets(model, cfg.scheme.ignore_layers)
    plan = plan_memory(cfg, model, adapter, selection.ignored)
    log.info("memory plan: %.2f GiB per device, %.2f GiB host per rank, checkpoint %.2f GiB",
             plan.device_total / GiB, plan.host_total / GiB, plan.checkpoint_bytes / GiB)
    if not plan.feasible:
        raise SlimError(f"this run does not fit hardware={cfg.hardware.name}: " + "; ".join(plan.problems)
                        + " (python -m slim.main mode=plan ... prints the breakdown)")
    dist = dist or Dist(device=torch.device(cfg.hardware.device))
    ids = calibration_tokens(cfg.calibration, tokenizer, getattr(model.config, "max_position_embeddings", None))
    if ids.shape[0] < dist.world:
        raise SlimError(f"{ids.shape[0]} calibration samples cannot be split over {dist.world} ranks; "
                        f"raise calibration.num_samples to at least {dist.world}")
    scheme = SCHEMES[cfg.scheme.name]
    if cfg.scheme.format not in FORMATS:
        raise SlimError(f"scheme.format={cfg.scheme.format!r} is unknown; choose one of: {', '.join(FORMATS)}")
    fmt = FORMATS[cfg.scheme.format]
    writer = CheckpointWriter(out_dir, tag=f"rank{dist.rank:03d}-" if dist.world > 1 else "")
    result = quantize_model(model=model, adapter=adapter, reader=reader, writer=writer, fmt=fmt, scheme=scheme,
                            input_ids=dist.shard(ids), cfg=cfg, device=dist.device, selection=selection, dist=dist)
    result.num_samples = int(ids.shape[0])
    shards = [shard for part in dist.gather(writer.close()) for shard in part]  # rank order
    config = {k: v for k, v in src_config.items() if k != "quantization_config"}
    config["torch_dtype"] = config["dtype"] = cfg.model.dtype
    config["quantization_config"] = fmt.quantization_config(
        scheme.name, result.ignored, cfg.scheme.group_size, not scheme.static_activations
    )
    config["slim"] = {
        "version": __version__,
        "scheme": scheme.name,
        "group_size": cfg.scheme.group_size,
        "ignore_layers": list(cfg.scheme.ignore_layers),
        "weight_observer": cfg.scheme.weight_observer,
        "source": str(source),
        "source_load_type": cfg.model.load_type,
        "calibration": {
            "name": cfg.calibration.name,
            "num_samples": int(ids.shape[0]),
            "seq_len": int(ids.shape[1]),
            "tokens_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
            "route_all_experts": cfg.calibration.route_all_experts,
        },
        "fallback_input_scales": result.fallbacks,
    }
    if dist.is_main:  # every rank has closed its shards (gather above): index and config go last
        finalize_checkpoint(out_dir, shards, config, source)
    return result.to_dict() | {"checkpoint_bytes": sum(nbytes for _, _, nbytes in shards)}


def eval_stage(cfg: SlimConfig, path: Path, load_type: str, tokenizer, workdir: Path) -> dict:
    from slim.evaluate import evaluate
    from slim.models.loading import load_model

    model = load_model(str(path), load_type=load_type, dtype=cfg.model.dtype,
                       trust_remote_code=cfg.model.trust_remote_code, device=cfg.hardware.device)
    try:
        return evaluate(model, tokenizer, cfg.eval, workdir)
    finally:
        del model


def plan_stage(cfg: SlimConfig) -> dict[str, Any]:
    """mode=plan: size the run from config.json alone; exit non-zero (SlimError) when it does not fit."""
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.loading import DTYPES
    from slim.plan import plan_memory
    from slim.targets import select_targets

    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        raise SlimError(f"model.path={path} has no config.json; mode=plan needs only that file")
    model, adapter = build_skeleton(load_config(str(path), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
    selection = select_targets(model, cfg.scheme.ignore_layers)
    plan = plan_memory(cfg, model, adapter, selection.ignored)
    print(plan.table())
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"slim_version": __version__, "mode": "plan", "model": cfg.model.name, "scheme": cfg.scheme.name,
               "plan": plan.to_dict()}
    write_results(run_dir, results)
    if not plan.feasible:
        raise SlimError("the run does not fit: " + "; ".join(plan.problems))
    return results


def run(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Run the configured job in this process (one rank of it under torchrun); returns results.json's content."""
    validate(cfg)
    if cfg.mode == "plan":
        return plan_stage(cfg)
    if cfg.mode == "sensitivity":
        from slim.sensitivity import sensitivity_stage

        return sensitivity_stage(cfg, resolved)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.hardware)
    try:
        return _run_job(cfg, resolved, dist)
    finally:
        shutdown()


def _run_job(cfg: SlimConfig, resolved: dict[str, Any], dist: Dist) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "checkpoint"
    if cfg.mode == "quantize" and dist.is_main and out_dir.exists():
        if (out_dir / "config.json").exists() and not cfg.overwrite:
            raise SlimError(f"{out_dir} already holds a finished checkpoint; choose another hydra.run.dir or set overwrite=true")
        shutil.rmtree(out_dir)  # an unfinished export (no config.json), or overwrite=true
    dist.barrier()

    stages = Stages()
    results: dict[str, Any] = {"slim_version": __version__, "mode": cfg.mode, "model": cfg.model.name,
                               "scheme": cfg.scheme.name, "run_dir": str(run_dir), "world_size": dist.world,
                               "metrics": {}}
    logger = cfg.logger if dist.is_main else dataclasses.replace(cfg.logger, mode="disabled")
    tracker = Tracker(logger, run_dir, resolved, name=f"{cfg.model.name}-{cfg.scheme.name}")
    exit_code = 1
    try:
        with stages("load"):
            source = prepare_source(cfg) if dist.is_main else Path(cfg.model.path)
            dist.barrier()  # the bf16 conversion (if any) is done once, by rank 0
            tokenizer = _load_tokenizer(source, cfg.model.trust_remote_code)
        if cfg.mode == "quantize":
            with stages("quantize"):
                qres = quantize_stage(cfg, source, out_dir, tokenizer, dist)
            results["checkpoint"] = str(out_dir)
            results["checkpoint_bytes"] = qres["checkpoint_bytes"]
            results["quantization"] = {k: qres[k] for k in ("ignored", "fallbacks", "skipped_prefixes", "num_samples")}
            if not dist.is_main:  # evaluation and records belong to rank 0
                exit_code = 0
                return results
            tracker.table("modules", qres["modules"])
            (run_dir / "modules.json").write_text(json.dumps(qres["modules"], indent=1) + "\n")
        elif not dist.is_main:
            exit_code = 0
            return results
        if cfg.eval.tasks:
            if cfg.mode == "quantize" and cfg.eval.baseline:
                with stages("eval_baseline"):
                    results["metrics"]["baseline"] = eval_stage(cfg, source, cfg.model.load_type, tokenizer, run_dir)
            target, which = (out_dir, "quantized") if cfg.mode == "quantize" else (source, "model")
            with stages(f"eval_{which}"):
                results["metrics"][which] = eval_stage(cfg, target, cfg.model.load_type, tokenizer, run_dir)
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
