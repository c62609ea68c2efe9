"""The held-out metric and the greedy search for the smallest ignore list that keeps it within target."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from slim.config import ASSETS, EvalConfig, SlimConfig
from slim.errors import SlimError
from slim.sensitivity.groups import Group, ignore_patterns
from slim.sensitivity.simulate import SimulatedModel, batches, text_tokens
from slim.targets import resolve_ignored

log = logging.getLogger(__name__)


def heldout_metric(cfg: SlimConfig, sim: SimulatedModel, tokenizer, calib: tuple, run_dir: Path) -> tuple[str, Callable[[], float]]:
    s = cfg.sensitivity
    if s.heldout == "calibration":
        hidden, labels = calib
        return "calibration token_perplexity", lambda: math.exp(sim.nll(hidden, labels))
    if s.heldout == "text":
        path = Path(s.heldout_path) if s.heldout_path else ASSETS / "data" / "heldout_ppl.jsonl"
        ids = batches(text_tokens(path, s.heldout_text_field, tokenizer, s.heldout_seq_len, s.heldout_max_tokens),
                      cfg.calibration.batch_size)
        hidden = sim.embed(ids)
        log.info("held-out text: %s, %d tokens", path, sum(b.numel() for b in ids))
        return f"held-out token_perplexity ({path.name})", lambda: math.exp(sim.nll(hidden, ids))
    from slim.evaluate import evaluate

    if not any(k in s.heldout_metric for k in ("perplexity", "bits_per_byte")):
        raise SlimError(f"sensitivity.heldout_metric={s.heldout_metric!r}: use a lower-is-better metric "
                        "(word_perplexity, byte_perplexity, bits_per_byte)")
    ecfg = EvalConfig(name="sensitivity", tasks=[s.heldout_task], batch_size=cfg.eval.batch_size, limit=cfg.eval.limit)

    def score() -> float:
        res = evaluate(sim.model, tokenizer, ecfg, run_dir)
        if s.heldout_metric not in res.get(s.heldout_task, {}):
            raise SlimError(f"lm-eval task {s.heldout_task} reports {sorted(res.get(s.heldout_task, {}))}, "
                            f"not {s.heldout_metric}; set sensitivity.heldout_metric")
        return res[s.heldout_task][s.heldout_metric]

    return f"{s.heldout_task} {s.heldout_metric}", score


@dataclass
class Step:
    phase: str  # add: keep the next most sensitive group | drop: quantize a kept group again
    kept: list[str]  # group keys left unquantized (beyond the non-candidates)
    metric: float
    rel_delta: float
    checkpoint_bytes: int
    quantized_bytes: int
    kept_bytes: int
    ignore_layers: list[str] = field(default_factory=list)


def checkpoint_sizes(groups: list[Group], quantized_keys: set[str], other_bytes: int) -> tuple[int, int, int]:
    q = sum(g.quantized_bytes for g in groups if g.key in quantized_keys)
    kept = sum(g.kept_bytes for g in groups if g.key not in quantized_keys)
    return q + kept + other_bytes, q, kept


def greedy_search(sim: SimulatedModel, groups: list[Group], ranked: list[Group], score: Callable[[], float],
                  base: float, target: float, max_groups: int | None, prune: bool, other_bytes: int,
                  label: str) -> tuple[list[Step], int]:
    """Keep the most sensitive groups unquantized one at a time until ``score`` is within ``target`` of
    ``base``; then (``prune``) quantize again every kept group, least sensitive first, that the target allows.
    Returns every step tried and the index of the chosen one."""
    fixed = [g for g in groups if not g.candidate]

    def step(phase: str, kept: list[Group]) -> Step:
        quantized = [g for g in ranked if g not in kept]
        with sim.simulate({n for g in quantized for n in g.modules}):
            value = score()
        rel = value / base - 1
        log.info("search (%s): %d group(s) kept unquantized -> %s %.4f (%+.3f%%)", phase, len(kept), label, value, 100 * rel)
        return Step(phase, [g.key for g in kept], value, rel, *checkpoint_sizes(groups, {g.key for g in quantized}, other_bytes),
                    ignore_patterns(fixed + kept, groups, sim.linears))

    limit = len(ranked) if max_groups is None else min(max_groups, len(ranked))
    steps: list[Step] = []
    with tqdm(total=limit + 1, desc="greedy search", unit="step") as bar:
        for k in range(limit + 1):
            steps.append(step("add", ranked[:k]))
            bar.update()
            if steps[-1].rel_delta <= target:
                break
    chosen = len(steps) - 1
    kept = ranked[:chosen]
    if prune and steps[chosen].rel_delta <= target and len(kept) > 1:
        for g in tqdm(kept[-2::-1], desc="prune", unit="step"):  # the last one added was needed
            steps.append(step("drop", [h for h in kept if h is not g]))
            if steps[-1].rel_delta <= target:
                kept, chosen = [h for h in kept if h is not g], len(steps) - 1
    return steps, chosen


def reference_row(cfg: SlimConfig, sim: SimulatedModel, groups: list[Group], metric, base: float, other_bytes: int) -> dict | None:
    """The held-out metric and size with ``scheme.ignore_layers`` exactly as configured."""
    if not cfg.sensitivity.compare_scheme_ignore:
        return None
    try:
        ignored, _ = resolve_ignored(cfg.scheme.ignore_layers, sim.linears)
    except SlimError as exc:
        log.info("sensitivity: scheme.ignore_layers does not apply to this model (%s); no reference row", exc)
        return None
    names = {n for n in sim.linears if n not in ignored}
    if cfg.scheme.group_size and sim.scheme.per_group:
        names = {n for n in names if sim.linears[n].in_features % cfg.scheme.group_size == 0}
    with sim.simulate(names):
        value = metric()
    quantized = {g.key for g in groups if set(g.modules) <= names}
    size, q, kept = checkpoint_sizes(groups, quantized, other_bytes)
    return {"ignore_layers": list(cfg.scheme.ignore_layers), "metric": value, "rel_delta": value / base - 1,
            "checkpoint_bytes": size, "quantized_bytes": q, "kept_bytes": kept}
