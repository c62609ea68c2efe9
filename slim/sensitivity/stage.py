"""The sensitivity stage: load, calibrate, rank, search, write ``sensitivity.json``/``.md`` and ``results.json``."""

from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from slim.calibration.runner import observe, route_all
from slim.config import SlimConfig
from slim.run import RunRecord
from slim.errors import SlimError
from slim.quant.schemes import scheme_from_config
from slim.sensitivity.groups import KINDS, Group, build_groups, group_row, hydra_override, ignore_patterns
from slim.sensitivity.report import to_markdown
from slim.sensitivity.search import checkpoint_sizes, greedy_search, heldout_metric, reference_row
from slim.sensitivity.simulate import SimulatedModel

log = logging.getLogger(__name__)

HELDOUT = ("text", "lm_eval", "calibration")
RANK_BY = ("loss", "loss_per_byte")
METHODS = ("whole_model", "layer_local")


def _check_fits(cfg: SlimConfig, model, adapter, n_tokens: int) -> None:
    """The whole model stays resident here (unlike mode=quantize): refuse early when it cannot fit."""
    from slim.plan import GiB, HOST_RUNTIME_BYTES, USABLE_FRACTION

    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    hidden = (len(adapter.layers(model)) + 1) * n_tokens * model.config.hidden_size * torch.finfo(model.dtype).bits // 8
    need = weights * 2 + hidden  # unquantized weights + quantized copies and temporaries (upper bound)
    cuda = cfg.hardware.device.startswith("cuda")
    capacity = (cfg.hardware.device_memory_gb if cuda else cfg.hardware.host_memory_gb) * GiB
    if not cuda:
        need += HOST_RUNTIME_BYTES
    if capacity and need > USABLE_FRACTION * capacity:
        raise SlimError(
            f"mode=sensitivity holds the whole model in memory: {cfg.model.name} needs about {need / GiB:.1f} GiB "
            f"({weights / GiB:.1f} GiB of weights in {cfg.model.dtype}, twice for the quantized copies, plus "
            f"{hidden / GiB:.2f} GiB of calibration hidden states) and hardware={cfg.hardware.name} gives "
            f"{capacity / GiB:.0f} GiB. Use hardware with more memory, or sensitivity.method=layer_local (streams "
            f"one layer at a time like mode=quantize: a layer-local ranking, no held-out search)")


def _validate(cfg: SlimConfig) -> None:
    s = cfg.sensitivity
    for value, valid, key in ((s.heldout, HELDOUT, "sensitivity.heldout"), (s.rank_by, RANK_BY, "sensitivity.rank_by"),
                              (s.method, METHODS, "sensitivity.method")):
        if value not in valid:
            raise SlimError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")
    unknown = [k for k in s.kinds if k not in KINDS]
    if unknown or not s.kinds:
        raise SlimError(f"sensitivity.kinds={list(s.kinds)}: choose one or more of {', '.join(KINDS)}")
    if not s.target_delta >= 0:
        raise SlimError(f"sensitivity.target_delta={s.target_delta} must be >= 0 (relative, e.g. 0.01 for 1%)")
    if s.max_groups is not None and s.max_groups < 0:
        raise SlimError(f"sensitivity.max_groups={s.max_groups} must be >= 0 (or null for no limit)")
    if s.heldout_seq_len < 2:
        raise SlimError(f"sensitivity.heldout_seq_len={s.heldout_seq_len} must be at least 2 tokens")
    if cfg.hardware.nodes * cfg.hardware.procs_per_node > 1:
        raise SlimError("mode=sensitivity runs in one process; use a one-rank hardware preset (hardware=cpu)")


def sensitivity_stage(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Rank the candidate groups, search the ignore list, write the reports; returns results.json's content."""
    _validate(cfg)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    torch.manual_seed(cfg.seed)
    with RunRecord(cfg, resolved, mode="sensitivity") as record:
        run_dir, stages = record.run_dir, record.stage
        run = _layer_local if cfg.sensitivity.method == "layer_local" else _whole_model
        report = run(cfg, stages, run_dir) | {"timings_s": stages.seconds}
        markdown = to_markdown(report)
        (run_dir / "sensitivity.json").write_text(json.dumps(report, indent=1) + "\n")
        (run_dir / "sensitivity.md").write_text(markdown + "\n")
        print(markdown)
        held = report["heldout"]
        results = record.results
        results["sensitivity"] = {k: report[k] for k in ("method", "ignore_layers", "override", "heldout", "bytes")}
        results["checkpoint_bytes"] = report["bytes"]["checkpoint"]
        if held:
            results["metrics"] = {"baseline": {"heldout": {held["metric"]: held["baseline"]}},
                                  "quantized": {"heldout": {held["metric"]: held["final"]}}}
        record.tracker.table("sensitivity/ranking", report["ranking"])
        if report["steps"]:
            record.tracker.table("sensitivity/steps", [
                st | {"kept": ",".join(st["kept"]), "ignore_layers": ",".join(st["ignore_layers"])}
                for st in report["steps"]])
        record.finish({"checkpoint_bytes": report["bytes"]["checkpoint"],
                       **({"sensitivity/baseline": held["baseline"], "sensitivity/final": held["final"]} if held else {})})
        log.info("sensitivity: %.1f s wall (%s)", sum(stages.seconds.values()),
                 ", ".join(f"{k} {v:.1f} s" for k, v in stages.seconds.items()))
        print(f"sensitivity: {run_dir / 'sensitivity.json'}\nresults: {run_dir / 'results.json'}")
        return results


def _setup(cfg: SlimConfig, sim: SimulatedModel, other_bytes: int) -> dict[str, Any]:
    """Groups and the report fields every method shares."""
    groups = build_groups(sim.linears, sim.prefixes, list(cfg.sensitivity.kinds), sim.scheme, cfg.scheme.group_size)
    if not any(g.candidate for g in groups):
        raise SlimError(f"no candidate group of kinds {list(cfg.sensitivity.kinds)} in {cfg.model.name}; "
                        "widen sensitivity.kinds")
    return {"groups": groups, "other_bytes": other_bytes,
            "report": {"model": cfg.model.name, "scheme": sim.scheme.name, "group_size": cfg.scheme.group_size,
                       "method": cfg.sensitivity.method, "rank_by": cfg.sensitivity.rank_by,
                       "not_candidates": [group_row(g) for g in groups if not g.candidate]}}


def _rank(cfg: SlimConfig, groups: list[Group]) -> list[Group]:
    per_byte = cfg.sensitivity.rank_by == "loss_per_byte"
    return sorted((g for g in groups if g.candidate), reverse=True,
                  key=lambda g: g.delta / max(g.saved_bytes, 1) if per_byte else g.delta)


def _whole_model(cfg: SlimConfig, stages, run_dir: Path) -> dict[str, Any]:
    """Whole model in memory: calibration-loss ranking, then the greedy search on the held-out metric."""
    from transformers import AutoTokenizer

    from slim.calibration.data import calibration_tokens
    from slim.models.adapters import adapter_for, build_skeleton, load_config
    from slim.models.loading import load_model, torch_dtype
    from slim.models.convert import prepare_source

    s = cfg.sensitivity
    with stages("load"):
        source = prepare_source(cfg.model)
        skeleton, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code),
                                           torch_dtype(cfg.model.dtype, cfg.hardware.device))
        _check_fits(cfg, skeleton, adapter, cfg.calibration.num_samples * cfg.calibration.seq_len)
        del skeleton
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
        model = load_model(str(source), load_type=cfg.model.load_type, dtype=cfg.model.dtype,
                           trust_remote_code=cfg.model.trust_remote_code, device=cfg.hardware.device)
    sim = SimulatedModel(model, adapter_for(model.config), scheme_from_config(cfg.scheme), cfg,
                         torch.device(cfg.hardware.device))
    weights = {id(m.weight) for m in sim.linears.values()}
    ctx = _setup(cfg, sim, sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in weights))
    groups, other_bytes, report = ctx["groups"], ctx["other_bytes"], ctx["report"]

    with stages("calibrate"):
        ids = calibration_tokens(cfg.calibration, tokenizer, getattr(model.config, "max_position_embeddings", None))
        labels = list(ids.split(cfg.calibration.batch_size))
        inputs = sim.calibrate(labels)
        base_sums, counts = sim.nll_per_sample(inputs[-1], labels, start=len(sim.layers))
        baseline_loss = float(base_sums.sum() / counts.sum())
    log.info("calibration: %d samples x %d tokens, unquantized mean token NLL %.5f", ids.shape[0], ids.shape[1], baseline_loss)

    with stages("rank"):
        for g in tqdm([g for g in groups if g.candidate], desc="quantize one group", unit="group"):
            start = len(sim.layers) if g.layer is None else g.layer
            with sim.simulate(set(g.modules)):
                sums, _ = sim.nll_per_sample(inputs[start], labels, start=start)
            g.loss = float(sums.sum() / counts.sum())
            g.delta = g.loss - baseline_loss
            paired = (sums - base_sums) / counts  # per-sequence change: its spread gives the standard error
            g.delta_se = float(paired.std() / math.sqrt(len(paired))) if len(paired) > 1 else math.nan
    ranked = _rank(cfg, groups)
    del inputs

    with stages("search"):
        label, metric = heldout_metric(cfg, sim, tokenizer, (sim.embed(labels), labels), run_dir)
        base_metric = metric()
        steps, chosen_index = greedy_search(sim, groups, ranked, metric, base_metric, s.target_delta, s.max_groups,
                                            s.prune, other_bytes, label)
        reference = reference_row(cfg, sim, groups, metric, base_metric, other_bytes)
    chosen = steps[chosen_index]
    met = chosen.rel_delta <= s.target_delta
    if not met:
        log.warning("sensitivity: the target %+.2f%% was not reached within sensitivity.max_groups=%s",
                    100 * s.target_delta, s.max_groups)
    return report | {
        "calibration": {"num_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "baseline_nll": baseline_loss},
        "ranking": [group_row(g, rank) for rank, g in enumerate(ranked, 1)],
        "heldout": {"metric": label, "baseline": base_metric, "final": chosen.metric,
                    "rel_delta": chosen.rel_delta, "target_delta": s.target_delta, "target_met": met},
        "steps": [asdict(st) for st in steps], "chosen_step": chosen_index, "reference": reference,
        "ignore_layers": chosen.ignore_layers, "override": hydra_override(chosen.ignore_layers),
        "bytes": {"checkpoint": chosen.checkpoint_bytes, "quantized_modules": chosen.quantized_bytes,
                  "kept_modules": chosen.kept_bytes, "other": other_bytes,
                  "unquantized_checkpoint": sum(g.kept_bytes for g in groups) + other_bytes},
        "fallback_input_scales": sorted(sim.fallbacks),
    }


def _layer_local(cfg: SlimConfig, stages, run_dir: Path) -> dict[str, Any]:
    """Streamed fallback for models too large to hold: one decoder layer resident at a time (as mode=quantize).
    Each group is scored by the error it adds to its own layer's output, relative to that layer's update
    ``|y_q - y|^2 / |y - x|^2`` (lm_head: relative to the logits). No held-out search: that needs the whole model;
    the suggested list keeps the ``sensitivity.max_groups`` top-ranked groups unquantized."""
    from transformers import AutoTokenizer

    from slim.calibration.data import calibration_tokens
    from slim.models.adapters import build_skeleton, load_config
    from slim.models.checkpoint import CheckpointReader
    from slim.models.loading import torch_dtype
    from slim.models.materialize import materialize, release
    from slim.models.convert import prepare_source
    from slim.quant.observers import resolve_input_clips
    from slim.quantize import resolve_amax

    with stages("load"):
        source = prepare_source(cfg.model)
        reader = CheckpointReader(source, load_type=cfg.model.load_type)
        reader.check_load_type()
        model, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code),
                                        torch_dtype(cfg.model.dtype, cfg.hardware.device))
        adapter.open_reader(reader, model.config)
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
    device = torch.device(cfg.hardware.device)
    sim = SimulatedModel(model, adapter, scheme_from_config(cfg.scheme), cfg, device)
    weights = {id(m.weight) for m in sim.linears.values()}
    ctx = _setup(cfg, sim, sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in weights))
    groups, other_bytes, report = ctx["groups"], ctx["other_bytes"], ctx["report"]
    ids = calibration_tokens(cfg.calibration, tokenizer, getattr(model.config, "max_position_embeddings", None))
    labels = list(ids.split(cfg.calibration.batch_size))

    def sq(a: list[torch.Tensor], b: list[torch.Tensor] | None = None) -> float:
        return float(sum((x.float() - (0 if b is None else y.float())).pow(2).sum() for x, y in zip(a, b or a)))

    with stages("rank"):
        head = adapter.head_modules(model)
        for prefix, mod in head.items():
            materialize(mod, prefix, reader, device)
        hidden = sim.embed(labels)
        for mod in head.values():
            release(mod)
        stations = [(i, layer, sim.prefixes[i]) for i, layer in enumerate(sim.layers)] + [(None, None, None)]
        for i, layer, prefix in tqdm(stations, desc="layer-local ranking", unit="layer"):
            mine = [g for g in groups if g.candidate and g.layer == i]
            if layer is None:  # the tail: final norm and lm_head
                for p, mod in adapter.tail_modules(model).items():
                    materialize(mod, p, reader, device)
                with torch.no_grad():
                    hidden = [model.model.norm(h) for h in hidden]
                forward = lambda: [model.lm_head(h) for h in hidden]  # noqa: E731
                mods = {n: m for n, m in sim.linears.items() if not any(n.startswith(q) for q in sim.prefixes)}
            else:
                materialize(layer, prefix, reader, device)
                forward = lambda: sim.runner.forward(layer, hidden, prefix.rstrip("."))  # noqa: E731
                mods = {n: m for n, m in sim.linears.items() if n.startswith(prefix)}
            routing = contextlib.nullcontext() if layer is None else route_all(layer, cfg.calibration.route_all_experts)
            with observe(mods, cfg.scheme.activation_observer) as obs, routing, torch.no_grad():
                out = forward()
            if sim.scheme.static_activations:
                resolve_input_clips(mods, obs)  # mse/percentile: the clip the input scale comes from
                amax, fallbacks = resolve_amax(obs)
                sim.amax.update(amax)
                sim.fallbacks |= fallbacks
            scale = sq(out) if layer is None else sq(out, hidden)
            for g in mine:
                with sim.simulate(set(g.modules)), torch.no_grad():
                    g.loss = g.delta = sq(forward(), out) / scale
            sim.forget()
            hidden = out
            release(layer if layer is not None else model)
    ranked = _rank(cfg, groups)
    k = min(cfg.sensitivity.max_groups or 0, len(ranked))
    kept = [g for g in groups if not g.candidate] + ranked[:k]
    quantized = {g.key for g in ranked[k:]}
    patterns = ignore_patterns(kept, groups, sim.linears)
    size, q, kept_bytes = checkpoint_sizes(groups, quantized, other_bytes)
    return report | {
        "calibration": {"num_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "baseline_nll": None},
        "ranking": [group_row(g, rank) for rank, g in enumerate(ranked, 1)],
        "heldout": None, "steps": [], "chosen_step": None, "reference": None, "kept_top": k,
        "ignore_layers": patterns, "override": hydra_override(patterns),
        "bytes": {"checkpoint": size, "quantized_modules": q, "kept_modules": kept_bytes, "other": other_bytes,
                  "unquantized_checkpoint": sum(g.kept_bytes for g in groups) + other_bytes},
        "fallback_input_scales": sorted(sim.fallbacks),
    }
