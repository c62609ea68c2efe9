"""The stages of a slim run, and the modes that compose them (``MODE_RUNNERS``, one entry per ``mode=``).

    quantize      load -> quantize (stream, calibrate, export) -> evaluate (baseline, quantized) -> track
    eval          load -> evaluate the source checkpoint -> track
    plan          size the run from config.json alone (``slim.plan``)
    sensitivity   rank module groups and search an ignore list (``slim.sensitivity``)

Every mode records its run through :class:`slim.run.RunRecord` (stage timings, results.json, W&B, exit code).
What a run directory may reuse is decided in :mod:`slim.rundir`; the allocator policy lives in :mod:`slim.hostmem`.
"""

from __future__ import annotations

import contextlib
import errno
import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from slim import __version__, collector, kernels
from slim.baseline import baseline_metrics
from slim.config import SlimConfig
from slim.distributed import Dist, init_distributed, shutdown
from slim.eval_ranks import serving_ranks
from slim.errors import SlimError
from slim.export import copied_files, finalize_checkpoint
from slim.formats import FORMATS
from slim.hostmem import no_gemm_kernel_cache, return_freed_memory_to_os
from slim.models.convert import prepare_source, source_dir
from slim.models.loading import resolve_dtype, torch_dtype
from slim.plan_mode import check_format, plan_stage
from slim.preflight import preflight
from slim.ranks import rank0_first
from slim.run import RunRecord
from slim.rundir import QUANTIZE_RECORD, atomic_json, eval_key, prepare_output, previous_results, run_fingerprint
from slim.tracking import metric_deltas, results_table, scores

log = logging.getLogger(__name__)


def check_source(cfg: SlimConfig) -> None:
    """Every source shard's header against its file (headers only), before any heavy work: a truncated or
    corrupt shard is named with all others at once, not found after hours of quantizing the layers before it."""
    from slim.models.adapters import check_architecture
    from slim.models.checkpoint import CheckpointReader

    path = source_dir(cfg.model)
    if (path / "config.json").is_file():
        check_architecture(path)  # before transformers reads anything of it (remote code)
        CheckpointReader(path, load_type=cfg.model.load_type).check_shards()
        copied_files(path)  # the tokenizer files the checkpoint will carry: regular files only


def _load_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)


def quantize_stage(cfg: SlimConfig, source: Path, out_dir: Path, tokenizer, dist: Dist | None = None,
                   fingerprint: str = "") -> dict[str, Any]:
    """Stream, calibrate, quantize and export; with several ranks each runs its slice of the samples.

    With ``export.resume`` it saves commit points and continues from the last one when the run dir has one.
    """
    from slim.calibration.data import calibration_tokens, check_seq_len
    from slim.export import CheckpointWriter
    from slim.hostmem import keep_temporaries_in_heap
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.checkpoint import CheckpointReader
    from slim.quant.schemes import scheme_from_config
    from slim.plan import GiB, plan_memory
    from slim.algorithms import build_algorithm
    from slim.layer_loop import quantize_model
    from slim.layout import ResumeSet, WriterGroup, WriterLayout, shards_in_slot_order
    from slim.quantize import kernel_path
    from slim.resume import ResumeStore
    from slim.targets import select_targets

    dist = dist or Dist(device=torch.device(cfg.hardware.device))
    store = ResumeStore(out_dir, dist.rank, fingerprint) if cfg.export.resume else None
    commit = store.commit_record() if store else None
    if commit and commit["fingerprint"] != fingerprint:  # another configuration's: not ours to continue
        commit = None
    if commit and commit["stage"] == "written":  # everything was written before the interruption
        log.info("every tensor was already written (commit in %s); finalizing", store.dir)
        return finish_export(store.load_written(), out_dir, source, store, dist)

    reader = CheckpointReader(source, load_type=cfg.model.load_type)
    reader.check_load_type()
    src_config = reader.config()
    dtype = torch_dtype(cfg.model.dtype, cfg.hardware.device)
    model, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code), dtype)
    adapter.open_reader(reader, model.config)
    selection = select_targets(model, cfg.scheme.ignore_layers)
    check_format(cfg, FORMATS[cfg.scheme.format], model, selection)
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
    scheme = scheme_from_config(cfg.scheme)
    fmt = FORMATS[cfg.scheme.format]  # a known name: validate checked it
    # calibration off on a CPU with the kernels: they do the work, torch only small ops (see torch_single_threaded)
    on_kernels = kernel_path(ids is not None, dist.device.type)
    # ... from block FP8: the weights go from the mapped codes to int4 on the kernels' own threads, and this thread
    # writes; elsewhere a writer thread writes while this one quantizes
    streamed = on_kernels and reader.is_block_fp8
    # the writer slots: the world size that started the export (slim.layout), whatever the world is now
    layout = WriterLayout(commit.get("slots", dist.world) if commit else dist.world, dist.rank, dist.world)
    writer = WriterGroup(layout, lambda tag: CheckpointWriter(
        out_dir, max_shard_bytes=cfg.export.max_shard_mb << 20, tag=tag, direct_io=cfg.export.direct_io,
        background=not streamed, algorithm=cfg.export.checksum, max_queued_bytes=plan.write_queue_bytes))
    if store is not None:
        store = ResumeSet(out_dir, layout, fingerprint, selection.targets, cfg.calibration.batch_size)
    if commit and layout.slots != dist.world:
        log.info("the export was started on %d rank(s), resumed on %d: %d writer slot(s) kept (rank r writes slots "
                 "r, r+%d, ...), calibration samples re-split", layout.slots, dist.world, layout.slots, dist.world)
    hidden_device = dist.device if plan.hidden_states_on == "device" else torch.device("cpu")
    start = store.load_layer(commit, hidden_device) if commit else None
    if dist.device.type == "cpu":  # the block-wise weight path's temporaries (a GPU's live on the GPU)
        keep_temporaries_in_heap()
    try:
        with kernels.torch_single_threaded() if on_kernels else contextlib.nullcontext(), \
                collector.long_lived_frozen():  # the skeleton and imports: out of the collector's walks
            result = quantize_model(model=model, adapter=adapter, reader=reader, writer=writer, fmt=fmt,
                                    scheme=scheme, input_ids=None if ids is None else dist.shard(ids), cfg=cfg,
                                    device=dist.device, selection=selection, dist=dist, store=store, start=start,
                                    hidden_device=hidden_device,
                                    algorithm=build_algorithm(cfg, scheme, fmt, dist, plan.expert_chunk))
    except BaseException as exc:
        writer.abandon()  # close the open shard file; the last commit point still describes it
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise SlimError(f"writing the checkpoint into {out_dir} failed: {exc.strerror}; free some space and "
                            "rerun the same command to resume from the last complete layer") from exc
        raise
    result.num_samples = 0 if ids is None else int(ids.shape[0])
    shards = shards_in_slot_order(dist.gather(writer.close()))
    checksums = {k: v for part in dist.gather(writer.checksums) for k, v in part.items()}
    config = checkpoint_config(cfg, src_config, fmt, scheme, result, ids, source, fingerprint)
    summary = result.to_dict() | {"checkpoint_bytes": sum(nbytes for _, _, nbytes in shards)}
    written = {"shards": shards, "checksums": checksums, "algorithm": writer.algorithm, "config": config,
               "result": summary, "extra_files": fmt.extra_files(config) if hasattr(fmt, "extra_files") else {}}
    if store is not None and dist.is_main:
        store.commit_written(written)
    return finish_export(written, out_dir, source, store, dist)


def checkpoint_config(cfg: SlimConfig, src_config: dict[str, Any], fmt, scheme, result, ids: torch.Tensor | None,
                      source: Path, fingerprint: str) -> dict[str, Any]:
    """The exported ``config.json``: the source's, with the format's ``quantization_config`` and slim's own block
    (scheme, ignore list, calibration set digest, fingerprint)."""
    config = {k: v for k, v in src_config.items() if k != "quantization_config"}
    config["torch_dtype"] = config["dtype"] = resolve_dtype(cfg.model.dtype, cfg.hardware.device)
    if config.get("tie_word_embeddings") and any(m.name == "lm_head" for m in result.modules):
        config["tie_word_embeddings"] = False  # its quantized tensors are its own now
        log.info("lm_head is quantized: the checkpoint unties it from the embedding (tie_word_embeddings=false)")
    config["quantization_config"] = fmt.quantization_config(
        scheme, result.ignored, cfg.scheme.group_size, not scheme.static_activations
    )
    config["slim"] = {
        "version": __version__,
        "fingerprint": fingerprint,
        "scheme": scheme.name,
        "group_size": cfg.scheme.group_size,
        "ignore_layers": list(cfg.scheme.ignore_layers),
        "weight_observer": cfg.scheme.weight_observer,
        # static input scales only: what chose their clip (slim.quant.observers.ACTIVATION_OBSERVERS)
        "activation_observer": cfg.scheme.activation_observer if scheme.static_activations else None,
        "algorithm": cfg.algorithm.name,
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
    if cfg.algorithm.name != "rtn":  # its settings, and the modules it left to round to nearest (rtn: bytes as before)
        config["slim"]["algorithm_config"] = dataclasses.asdict(cfg.algorithm)
        config["slim"]["algorithm_fallbacks"] = sorted(m.name for m in result.modules if m.algorithm == "rtn-fallback")
    return config


def finish_export(written: dict[str, Any], out_dir: Path, source: Path, store, dist: Dist) -> dict[str, Any]:
    """Rank 0 names the shards and writes manifest, index and config last (every rank has closed its shards)."""
    dist.barrier()
    if dist.is_main:
        for fname, obj in written.get("extra_files", {}).items():  # the format's other config files, before config.json
            atomic_json(out_dir / fname, obj)
        finalize_checkpoint(out_dir, written["shards"], written["config"], source, written["checksums"],
                            written["algorithm"])
        atomic_json(out_dir.parent / QUANTIZE_RECORD, written["result"])
        if store is not None:
            store.clear()
    return written["result"]


def eval_stage(cfg: SlimConfig, path: Path, load_type: str, tokenizer, workdir: Path, dist: Dist | None = None) -> dict:
    """Score a checkpoint directory with the configured backend (slim.evaluate.BACKENDS) and numerics."""
    from slim.evaluate import evaluate_checkpoint, model_settings

    return evaluate_checkpoint(path, cfg.eval, workdir, tokenizer=tokenizer,
                               model=model_settings(cfg, path, load_type), dist=dist)


def eval_on_all_ranks(cfg: SlimConfig, dist: Dist) -> bool:
    """Whether the other ranks score their share of the evaluation (the streamed backend) or are done after the
    quantize stage."""
    return bool(cfg.eval.tasks) and cfg.eval.backend == "streamed" and dist.world > 1


def checkpoint_numerics(eval_cfg, path: Path) -> str:
    from slim.evaluate import numerics_for

    return numerics_for(eval_cfg, path)


def _job(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """mode=quantize and mode=eval: one process per rank under torchrun, a single one otherwise."""
    kernels.configure(cfg.hardware.cpu_kernels)
    no_gemm_kernel_cache()
    return_freed_memory_to_os()
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    torch.manual_seed(cfg.seed)
    dist = init_distributed(cfg.hardware)
    try:
        return _run_job(cfg, resolved, dist)
    finally:
        shutdown()


def _sensitivity(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    from slim.sensitivity import sensitivity_stage

    kernels.configure(cfg.hardware.cpu_kernels)
    no_gemm_kernel_cache()
    return sensitivity_stage(cfg, resolved)


MODE_RUNNERS: dict[str, Callable[[SlimConfig, dict[str, Any]], dict[str, Any]]] = {
    "quantize": _job,
    "plan": lambda cfg, resolved: plan_stage(cfg),
    "eval": _job,
    "sensitivity": _sensitivity,
}  # keys: slim.config.MODES (validate checks mode against those names before anything is imported)


def run(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Run the configured job in this process (one rank of it under torchrun); returns results.json's content."""
    preflight(cfg)
    cfg.model.dtype = resolve_dtype(cfg.model.dtype, cfg.hardware.device)
    if isinstance(resolved.get("model"), dict):
        resolved["model"]["dtype"] = cfg.model.dtype  # what W&B and the records show
    return MODE_RUNNERS[cfg.mode](cfg, resolved)


def _evaluate(cfg: SlimConfig, record: RunRecord, source: Path, out_dir: Path, tokenizer,
              previous: dict[str, Any], dist: Dist) -> None:
    """The evaluation stages: the unquantized baseline (cached across runs) and the quantized checkpoint, or the
    source alone in mode=eval; a stage an earlier attempt of this run finished is taken from its results."""
    results, run_dir = record.results, record.run_dir
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
        with record.stage(f"eval_{which}"):
            if which == "baseline":
                results["metrics"][which], results["baseline_cached"] = baseline_metrics(
                    cfg, source, lambda: eval_stage(cfg, source, cfg.model.load_type, tokenizer, run_dir, dist))
            else:
                results["metrics"][which] = eval_stage(cfg, target, cfg.model.load_type, tokenizer, run_dir, dist)
        record_eval = results.setdefault("eval", {"backend": cfg.eval.backend, "numerics": {}})
        record_eval["numerics"][which] = checkpoint_numerics(cfg.eval, target)
        if eval_on_all_ranks(cfg, dist):
            record_eval["ranks"] = dist.world
        record.save()  # a later failure keeps this stage's scores


def _run_job(cfg: SlimConfig, resolved: dict[str, Any], dist: Dist) -> dict[str, Any]:
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    out_dir = run_dir / "checkpoint"
    check_source(cfg)  # before the fingerprint, which is taken only from a source that reads whole
    fingerprint = run_fingerprint(cfg)
    key = eval_key(cfg)
    done = prepare_output(cfg, out_dir, fingerprint, dist) if cfg.mode == "quantize" else False
    previous = previous_results(run_dir, fingerprint, key) if dist.is_main and not cfg.overwrite else {}

    with RunRecord(cfg, resolved, track=dist.is_main,
                   world_size=dist.world, fingerprint=fingerprint, eval_key=key) as record:
        results = record.results
        with record.stage("load"):
            # the bf16 conversion (if any) is done once, by rank 0; the others wait without a collective timeout
            source = rank0_first(dist, run_dir, "preparing the source checkpoint (model.convert_from)",
                                 lambda: prepare_source(cfg.model), cfg.hardware.rank0_wait_s) or Path(cfg.model.path)
            tokenizer = _load_tokenizer(source, cfg.model.trust_remote_code)
        if cfg.mode == "quantize":
            if done:
                qres = json.loads((run_dir / QUANTIZE_RECORD).read_text())
                results["skipped_stages"] = ["quantize"]
            else:
                with record.stage("quantize"):
                    qres = quantize_stage(cfg, source, out_dir, tokenizer, dist, fingerprint)
            results["checkpoint"] = str(out_dir)
            results["checkpoint_bytes"] = qres["checkpoint_bytes"]
            results["quantization"] = {k: qres[k] for k in ("ignored", "fallbacks", "skipped_prefixes", "num_samples")}
        if not dist.is_main:  # records belong to rank 0; the streamed backend's batches are spread over all ranks
            if eval_on_all_ranks(cfg, dist):
                from slim.evaluate_streamed import serve_streamed_eval

                serve_streamed_eval(dist)
            record.exit_code = 0
            return results
        with serving_ranks(dist, eval_on_all_ranks(cfg, dist)):  # the other ranks leave however this ends
            if cfg.mode == "quantize":
                (run_dir / "modules.json").write_text(json.dumps(qres["modules"], indent=1) + "\n")
                record.tracker.modules(qres["modules"], file=run_dir / "modules.json")
            if cfg.eval.tasks:
                _evaluate(cfg, record, source, out_dir, tokenizer, previous, dist)
        if "baseline" in results["metrics"] and "quantized" in results["metrics"]:
            results["delta"] = metric_deltas(results["metrics"]["baseline"], results["metrics"]["quantized"])
        record.tracker.metrics(scores(results["metrics"]))  # deltas included
        record.finish({"checkpoint_bytes": results.get("checkpoint_bytes")})
        if results["metrics"]:
            print(results_table(results["metrics"]))
        print(f"results: {run_dir / 'results.json'}" + (f"\ncheckpoint: {out_dir}" if "checkpoint" in results else ""))
        return results
