"""mode=sensitivity: which module groups a scheme can quantize, and the smallest ``ignore_layers`` that is safe.

1. Load the whole model (unquantized, e.g. bf16 from DeepSeek's FP8 release) and walk the calibration set
   through it layer by layer with input observers (slim's calibration code, so the activation scales are the
   ones ``mode=quantize`` computes); each layer's input hidden states are kept.
2. Candidate groups: per decoder layer, attention, dense MLP, shared experts and routed experts (all of a
   layer's experts as one group), plus ``lm_head``; each comes with the ``ignore_layers`` pattern selecting it.
3. Each group is quantized alone (the scheme's weights and static input scales, simulated with
   SimQuantLinear: the values export writes) and the calibration set is run from that group's layer on;
   the increase of the mean token NLL over the unquantized model ranks the groups.
4. Greedy search: quantize every candidate, then leave the most sensitive groups unquantized one at a time
   until the held-out metric is within ``sensitivity.target_delta`` (relative) of the unquantized model.

Writes ``sensitivity.json``, ``sensitivity.md`` and ``results.json`` in the run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from slim import __version__
from slim.calibration.runner import LayerRunner, observe, route_all
from slim.config import ASSETS, EvalConfig, SlimConfig
from slim.errors import SlimError
from slim.models.simulated import SimQuantLinear, swap_in
from slim.quant.schemes import SCHEMES, Scheme
from slim.quant.types import QuantizedLinear
from slim.targets import matches, resolve_ignored

log = logging.getLogger(__name__)

KINDS = ("attention", "dense_mlp", "shared_experts", "routed_experts", "lm_head")
# one pattern for every group of a kind (used when the whole kind stays unquantized)
KIND_PATTERNS = {"attention": "self_attn", "dense_mlp": r"re:model\.layers\.\d+\.mlp\.(gate|up|down)_proj$",
                 "shared_experts": "shared_experts", "routed_experts": "mlp.experts", "lm_head": "lm_head"}
_IN_LAYER = {"attention": "self_attn", "dense_mlp": "mlp", "shared_experts": "mlp.shared_experts",
             "routed_experts": "mlp.experts"}
_ROUTED = re.compile(r"mlp\.experts\.\d+\.")
_DENSE = re.compile(r"mlp\.(gate|up|down)_proj")
HELDOUT = ("text", "lm_eval", "calibration")
RANK_BY = ("loss", "loss_per_byte")
METHODS = ("whole_model", "layer_local")


def classify(rest: str) -> str | None:
    """The kind of a Linear from its name inside a decoder layer (``self_attn.q_a_proj``, ``mlp.experts.3.up_proj``)."""
    if rest.startswith("self_attn."):
        return "attention"
    if rest.startswith("mlp.shared_experts."):
        return "shared_experts"
    if _ROUTED.match(rest):
        return "routed_experts"
    if _DENSE.fullmatch(rest):
        return "dense_mlp"
    return None


@dataclass
class Group:
    """Linears that are quantized or kept together, and the ``ignore_layers`` pattern selecting exactly them."""

    key: str  # e.g. "layers.3.routed_experts", "lm_head"
    kind: str | None
    layer: int | None
    pattern: str
    modules: list[str]
    params: int
    kept_bytes: int  # weights as the source dtype
    quantized_bytes: int  # weights (+ scales) under the scheme
    candidate: bool = True
    note: str = ""
    loss: float = math.nan  # calibration mean token NLL with this group alone quantized
    delta: float = math.nan  # loss - baseline
    delta_se: float = math.nan  # standard error of delta over the calibration sequences (paired)

    @property
    def saved_bytes(self) -> int:
        return self.kept_bytes - self.quantized_bytes


def _pattern(name: str, modules: list[str], linears: dict[str, nn.Linear]) -> str:
    """``name`` if it selects exactly ``modules`` among ``linears``, else a regex of the exact names."""
    if {n for n in linears if matches(name, n)} == set(modules):
        return name
    return "re:(" + "|".join(re.escape(n) for n in modules) + ")$"


def build_groups(linears: dict[str, nn.Linear], layer_prefixes: list[str], kinds: list[str], scheme: Scheme,
                 group_size: int | None) -> list[Group]:
    """Every Linear in exactly one group; groups of a kind not in ``kinds`` (or that cannot be quantized with
    the group size) have ``candidate=False`` and stay unquantized."""
    from slim.plan import _quantized_bytes

    members: dict[tuple[int | None, str | None, str], list[str]] = {}
    for name in linears:
        layer = next((i for i, p in enumerate(layer_prefixes) if name.startswith(p)), None)
        if layer is not None:
            kind = classify(name[len(layer_prefixes[layer]):])
            where = f"{layer_prefixes[layer]}{_IN_LAYER[kind]}" if kind else name
        else:
            kind, where = ("lm_head", "lm_head") if name == "lm_head" else (None, name)
        members.setdefault((layer, kind, where), []).append(name)
    groups = []
    for (layer, kind, where), names in members.items():
        mods = [linears[n] for n in names]
        params = sum(m.weight.numel() for m in mods)
        key = where if layer is None or kind is None else f"layers.{layer}.{kind}"
        note, candidate = "", kind is not None and kind in kinds
        if kind is None:
            note = "not a candidate kind"
        elif not candidate:
            note = f"kind {kind} not in sensitivity.kinds"
        bad = [n for n, m in zip(names, mods) if scheme.per_group and m.in_features % group_size]
        if candidate and bad:
            candidate, note = False, f"group_size {group_size} does not divide in_features of {bad[0]}"
            log.warning("sensitivity: %s stays unquantized: %s", key, note)
        groups.append(Group(
            key=key, kind=kind, layer=layer, pattern=_pattern(where, names, linears), modules=names, params=params,
            kept_bytes=sum(m.weight.numel() * m.weight.element_size() for m in mods),
            quantized_bytes=0 if bad else sum(_quantized_bytes(m, scheme, group_size) for m in mods),
            candidate=candidate, note=note))
    return groups


def ignore_patterns(kept: list[Group], groups: list[Group], linears: dict[str, nn.Linear]) -> list[str]:
    """The shortest ``ignore_layers`` list selecting exactly the modules of ``kept``: a whole kind collapses to
    its one pattern (``self_attn``, ``shared_experts``, ...). Checked against slim's own pattern resolution."""
    kept_keys = {g.key for g in kept}
    patterns: list[str] = []
    for kind in (*KINDS, None):
        of_kind = [g for g in groups if g.kind == kind]
        mine = [g for g in of_kind if g.key in kept_keys]
        if not mine:
            continue
        names = {n for g in of_kind for n in g.modules}
        whole = kind is not None and len(mine) == len(of_kind)
        if whole and {n for n in linears if matches(KIND_PATTERNS[kind], n)} == names:
            patterns.append(KIND_PATTERNS[kind])
        else:
            patterns += [g.pattern for g in sorted(mine, key=lambda g: (g.layer is None, g.layer or 0))]
    want = {n for g in kept for n in g.modules}
    got = resolve_ignored(patterns, linears)[0] if patterns else set()
    assert got == want, f"ignore patterns {patterns} select {sorted(got ^ want)[:5]} wrongly"
    return patterns


def hydra_override(patterns: list[str]) -> str:
    """A shell-ready ``scheme.ignore_layers=[...]`` override (regex patterns quoted for Hydra)."""
    items = [p if re.fullmatch(r"[\w.\-]+", p) else '"' + p.replace('"', '\\"') + '"' for p in patterns]
    return "'scheme.ignore_layers=[" + ",".join(items) + "]'"


def text_tokens(path: Path, field_name: str, tokenizer, seq_len: int, max_tokens: int | None) -> list[torch.Tensor]:
    """Held-out documents joined with EOS, cut into [1, <=seq_len] chunks (the last one may be shorter)."""
    if not path.is_file():
        raise SlimError(f"held-out text {path} does not exist; set sensitivity.heldout_path=<file.jsonl>")
    stream: list[int] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if field_name not in record:
            raise SlimError(f"{path}:{lineno} has no field {field_name!r}; set sensitivity.heldout_text_field")
        stream += tokenizer(str(record[field_name]), add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            stream.append(tokenizer.eos_token_id)
        if max_tokens and len(stream) >= max_tokens:
            break
    stream = stream[:max_tokens] if max_tokens else stream
    if len(stream) < 2:
        raise SlimError(f"held-out text {path} has fewer than 2 tokens")
    ids = torch.tensor(stream, dtype=torch.long)
    return [c.unsqueeze(0) for c in ids.split(seq_len) if c.numel() > 1]


def batches(chunks: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """[1, T] chunks -> [b, T] batches of equal length (order kept)."""
    out: list[torch.Tensor] = []
    for c in chunks:
        if out and out[-1].shape[1] == c.shape[1] and out[-1].shape[0] < batch_size:
            out[-1] = torch.cat([out[-1], c])
        else:
            out.append(c)
    return out


class SimulatedModel:
    """An in-memory model whose target Linears can be swapped for their quantized simulation, and the losses."""

    def __init__(self, model, adapter, scheme: Scheme, cfg: SlimConfig, device: torch.device):
        self.model, self.adapter, self.scheme, self.cfg = model, adapter, scheme, cfg
        self.layers = adapter.layers(model)
        self.prefixes = [adapter.layer_prefix(i) for i in range(len(self.layers))]
        self.runner = LayerRunner(model, device)
        self.linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        self.amax: dict[str, torch.Tensor] = {}
        self.fallbacks: set[str] = set()
        self._q: dict[str, QuantizedLinear] = {}

    def embed(self, ids: list[torch.Tensor]) -> list[torch.Tensor]:
        emb = self.model.model.embed_tokens
        with torch.no_grad():
            return [emb(b.to(self.runner.device)) for b in ids]

    def calibrate(self, ids: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """Observe every Linear's inputs over the calibration batches; return each layer's inputs (+ final)."""
        from slim.quant.observers import ACTIVATION_OBSERVERS
        from slim.quantize import resolve_amax

        obs_name = self.cfg.scheme.activation_observer
        inputs = [self.embed(ids)]
        observers = {}
        for i, layer in enumerate(tqdm(self.layers, desc="calibrate layers", unit="layer", leave=False)):
            mods = {n: m for n, m in self.linears.items() if n.startswith(self.prefixes[i])}
            with observe(mods, obs_name) as obs, route_all(layer, self.cfg.calibration.route_all_experts):
                inputs.append(self.runner.forward(layer, inputs[-1], self.prefixes[i].rstrip(".")))
            observers.update(obs)
        rest = {n: m for n, m in self.linears.items() if n not in observers}  # lm_head: input is the final norm's output
        with torch.no_grad():
            for n in rest:
                observers[n] = ACTIVATION_OBSERVERS[obs_name]()
                for h in inputs[-1]:
                    observers[n].update(self.model.model.norm(h))
        if self.scheme.static_activations:
            self.amax, self.fallbacks = resolve_amax(observers)
        return inputs

    def quantized(self, name: str) -> QuantizedLinear:
        if name not in self._q:
            from slim.formats import FORMATS

            fmt = FORMATS.get(self.cfg.scheme.format)
            self._q[name] = self.scheme.quantize(self.linears[name].weight, self.amax.get(name), self.cfg.scheme.group_size,
                                                 self.cfg.scheme.weight_observer, getattr(fmt, "group_scale_dtype", None))
        return self._q[name]

    @contextlib.contextmanager
    def simulate(self, names: set[str]):
        """Inside the block, the Linears ``names`` compute with their quantized values."""
        originals = {n: swap_in(self.model, n, SimQuantLinear(self.quantized(n), self.linears[n].bias)) for n in sorted(names)}
        try:
            yield
        finally:
            for n, m in originals.items():
                swap_in(self.model, n, m)

    @torch.no_grad()
    def nll_per_sample(self, hidden: list[torch.Tensor], labels: list[torch.Tensor], start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token NLL sums and token counts per sequence ([N] each, fp32 log-softmax), running ``hidden``
        (the inputs of layer ``start``) through the rest of the model."""
        for i in range(start, len(self.layers)):
            hidden = self.runner.forward(self.layers[i], hidden, self.prefixes[i].rstrip("."))
        sums, counts = [], []
        for h, y in zip(hidden, labels):
            logits = self.model.lm_head(self.model.model.norm(h)).float()  # [b, T, V]
            y = y.to(logits.device)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), y[:, 1:], reduction="none")  # [b, T-1]
            sums.append(nll.sum(dim=1).cpu())
            counts.append(torch.full((y.shape[0],), y.shape[1] - 1))
        return torch.cat(sums), torch.cat(counts)

    def nll(self, hidden: list[torch.Tensor], labels: list[torch.Tensor], start: int = 0) -> float:
        """Mean next-token NLL over all tokens."""
        sums, counts = self.nll_per_sample(hidden, labels, start)
        return float(sums.sum() / counts.sum())


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


def _heldout_metric(cfg: SlimConfig, sim: SimulatedModel, tokenizer, calib: tuple, run_dir: Path) -> tuple[str, Callable[[], float]]:
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


def _sizes(groups: list[Group], quantized_keys: set[str], other_bytes: int) -> tuple[int, int, int]:
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
        return Step(phase, [g.key for g in kept], value, rel, *_sizes(groups, {g.key for g in quantized}, other_bytes),
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
    if cfg.hardware.nodes * cfg.hardware.procs_per_node > 1:
        raise SlimError("mode=sensitivity runs in one process; use a one-rank hardware preset (hardware=cpu)")


def sensitivity_stage(cfg: SlimConfig, resolved: dict[str, Any]) -> dict[str, Any]:
    """Rank the candidate groups, search the ignore list, write the reports; returns results.json's content."""
    from slim.pipeline import Stages
    from slim.tracking import Tracker, peak_memory, write_results

    _validate(cfg)
    if cfg.hardware.threads:
        torch.set_num_threads(cfg.hardware.threads)
    torch.manual_seed(cfg.seed)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = Stages()
    tracker = Tracker(cfg.logger, run_dir, resolved, name=f"{cfg.model.name}-{cfg.scheme.name}-sensitivity")
    exit_code = 1
    try:
        run = _layer_local if cfg.sensitivity.method == "layer_local" else _whole_model
        report = run(cfg, stages, run_dir) | {"timings_s": stages.seconds}
        markdown = to_markdown(report)
        (run_dir / "sensitivity.json").write_text(json.dumps(report, indent=1) + "\n")
        (run_dir / "sensitivity.md").write_text(markdown + "\n")
        print(markdown)
        held = report["heldout"]
        results = {"slim_version": __version__, "mode": "sensitivity", "model": cfg.model.name, "scheme": cfg.scheme.name,
                   "run_dir": str(run_dir), "metrics": {},
                   "sensitivity": {k: report[k] for k in ("method", "ignore_layers", "override", "heldout", "bytes")},
                   "checkpoint_bytes": report["bytes"]["checkpoint"], "timings_s": stages.seconds, "peak_memory": peak_memory()}
        if held:
            results["metrics"] = {"baseline": {"heldout": {held["metric"]: held["baseline"]}},
                                  "quantized": {"heldout": {held["metric"]: held["final"]}}}
        write_results(run_dir, results)
        tracker.table("sensitivity/ranking", report["ranking"])
        if report["steps"]:
            tracker.table("sensitivity/steps", [st | {"kept": ",".join(st["kept"]), "ignore_layers": ",".join(st["ignore_layers"])}
                                                for st in report["steps"]])
        tracker.summary({"checkpoint_bytes": report["bytes"]["checkpoint"], **{f"time/{k}": v for k, v in stages.seconds.items()},
                         **({"sensitivity/baseline": held["baseline"], "sensitivity/final": held["final"]} if held else {})})
        log.info("sensitivity: %.1f s wall (%s)", sum(stages.seconds.values()),
                 ", ".join(f"{k} {v:.1f} s" for k, v in stages.seconds.items()))
        print(f"sensitivity: {run_dir / 'sensitivity.json'}\nresults: {run_dir / 'results.json'}")
        exit_code = 0
        return results
    finally:
        tracker.finish(exit_code)


def _setup(cfg: SlimConfig, sim: SimulatedModel, other_bytes: int) -> dict[str, Any]:
    """Groups and the report fields every method shares."""
    groups = build_groups(sim.linears, sim.prefixes, list(cfg.sensitivity.kinds), sim.scheme, cfg.scheme.group_size)
    if not any(g.candidate for g in groups):
        raise SlimError(f"no candidate group of kinds {list(cfg.sensitivity.kinds)} in {cfg.model.name}; "
                        "widen sensitivity.kinds")
    return {"groups": groups, "other_bytes": other_bytes,
            "report": {"model": cfg.model.name, "scheme": sim.scheme.name, "group_size": cfg.scheme.group_size,
                       "method": cfg.sensitivity.method, "rank_by": cfg.sensitivity.rank_by,
                       "not_candidates": [_group_row(g) for g in groups if not g.candidate]}}


def _rank(cfg: SlimConfig, groups: list[Group]) -> list[Group]:
    per_byte = cfg.sensitivity.rank_by == "loss_per_byte"
    return sorted((g for g in groups if g.candidate), reverse=True,
                  key=lambda g: g.delta / max(g.saved_bytes, 1) if per_byte else g.delta)


def _whole_model(cfg: SlimConfig, stages, run_dir: Path) -> dict[str, Any]:
    """Whole model in memory: calibration-loss ranking, then the greedy search on the held-out metric."""
    from transformers import AutoTokenizer

    from slim.calibration.data import calibration_tokens
    from slim.models.adapters import adapter_for, build_skeleton, load_config
    from slim.models.loading import DTYPES, load_model
    from slim.pipeline import prepare_source

    s = cfg.sensitivity
    with stages("load"):
        source = prepare_source(cfg)
        skeleton, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
        _check_fits(cfg, skeleton, adapter, cfg.calibration.num_samples * cfg.calibration.seq_len)
        del skeleton
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
        model = load_model(str(source), load_type=cfg.model.load_type, dtype=cfg.model.dtype,
                           trust_remote_code=cfg.model.trust_remote_code, device=cfg.hardware.device)
    sim = SimulatedModel(model, adapter_for(model.config), SCHEMES[cfg.scheme.name], cfg, torch.device(cfg.hardware.device))
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
        label, metric = _heldout_metric(cfg, sim, tokenizer, (sim.embed(labels), labels), run_dir)
        base_metric = metric()
        steps, chosen_index = greedy_search(sim, groups, ranked, metric, base_metric, s.target_delta, s.max_groups,
                                            s.prune, other_bytes, label)
        reference = _reference(cfg, sim, groups, metric, base_metric, other_bytes)
    chosen = steps[chosen_index]
    met = chosen.rel_delta <= s.target_delta
    if not met:
        log.warning("sensitivity: the target %+.2f%% was not reached within sensitivity.max_groups=%s",
                    100 * s.target_delta, s.max_groups)
    return report | {
        "calibration": {"num_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "baseline_nll": baseline_loss},
        "ranking": [_group_row(g, rank) for rank, g in enumerate(ranked, 1)],
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
    from slim.models.loading import DTYPES
    from slim.models.materialize import materialize, release
    from slim.pipeline import prepare_source
    from slim.quantize import resolve_amax

    with stages("load"):
        source = prepare_source(cfg)
        reader = CheckpointReader(source, load_type=cfg.model.load_type)
        reader.check_load_type()
        model, adapter = build_skeleton(load_config(str(source), cfg.model.trust_remote_code), DTYPES[cfg.model.dtype])
        adapter.open_reader(reader, model.config)
        tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=cfg.model.trust_remote_code)
    device = torch.device(cfg.hardware.device)
    sim = SimulatedModel(model, adapter, SCHEMES[cfg.scheme.name], cfg, device)
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
                amax, fallbacks = resolve_amax(obs)
                sim.amax.update(amax)
                sim.fallbacks |= fallbacks
            scale = sq(out) if layer is None else sq(out, hidden)
            for g in mine:
                with sim.simulate(set(g.modules)), torch.no_grad():
                    g.loss = g.delta = sq(forward(), out) / scale
            sim._q.clear()
            hidden = out
            release(layer if layer is not None else model)
    ranked = _rank(cfg, groups)
    k = min(cfg.sensitivity.max_groups or 0, len(ranked))
    kept = [g for g in groups if not g.candidate] + ranked[:k]
    quantized = {g.key for g in ranked[k:]}
    patterns = ignore_patterns(kept, groups, sim.linears)
    size, q, kept_bytes = _sizes(groups, quantized, other_bytes)
    return report | {
        "calibration": {"num_samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "baseline_nll": None},
        "ranking": [_group_row(g, rank) for rank, g in enumerate(ranked, 1)],
        "heldout": None, "steps": [], "chosen_step": None, "reference": None, "kept_top": k,
        "ignore_layers": patterns, "override": hydra_override(patterns),
        "bytes": {"checkpoint": size, "quantized_modules": q, "kept_modules": kept_bytes, "other": other_bytes,
                  "unquantized_checkpoint": sum(g.kept_bytes for g in groups) + other_bytes},
        "fallback_input_scales": sorted(sim.fallbacks),
    }


def _reference(cfg: SlimConfig, sim: SimulatedModel, groups: list[Group], metric, base: float, other_bytes: int) -> dict | None:
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
    size, q, kept = _sizes(groups, quantized, other_bytes)
    return {"ignore_layers": list(cfg.scheme.ignore_layers), "metric": value, "rel_delta": value / base - 1,
            "checkpoint_bytes": size, "quantized_bytes": q, "kept_bytes": kept}


def _group_row(g: Group, rank: int | None = None) -> dict[str, Any]:
    row = {"rank": rank} if rank is not None else {}
    return row | {"group": g.key, "kind": g.kind, "layer": g.layer, "pattern": g.pattern, "modules": len(g.modules),
                  "params": g.params, "kept_bytes": g.kept_bytes, "quantized_bytes": g.quantized_bytes,
                  "loss": g.loss, "delta": g.delta, "delta_se": g.delta_se, **({"note": g.note} if g.note else {})}


def to_markdown(r: dict) -> str:
    mb = lambda b: f"{b / 2**20:.2f}"  # noqa: E731
    cal, held, local = r["calibration"], r["heldout"], r["method"] == "layer_local"
    title = f"## Sensitivity: {r['model']}, {r['scheme']}" + (f" (group {r['group_size']})" if r["group_size"] else "")
    if local:
        lines = [title + " - LAYER-LOCAL (streamed)", "", "Each group quantized alone, scored by the error it adds to "
                 "its own layer's output relative to that layer's update (lm_head: to the logits), not by the model's "
                 f"loss; calibration {cal['num_samples']} x {cal['seq_len']} tokens. No held-out search was run (it needs "
                 f"the whole model in memory). Ranked by {r['rank_by']}.", "",
                 "| rank | group | pattern | modules | params | MiB kept -> quantized | rel. output error |",
                 "|---:|---|---|---:|---:|---:|---:|"]
    else:
        lines = [title, "", f"Each group quantized alone; calibration {cal['num_samples']} x {cal['seq_len']} tokens, "
                 f"unquantized mean token NLL {cal['baseline_nll']:.5f}. Ranked by {r['rank_by']}.", "",
                 "| rank | group | pattern | modules | params | MiB kept -> quantized | NLL | delta NLL ± s.e. |",
                 "|---:|---|---|---:|---:|---:|---:|---:|"]
    for g in r["ranking"]:
        score = f"{g['delta']:.3e}" if local else f"{g['loss']:.5f} | {g['delta']:+.5f} ± {g['delta_se']:.5f}"
        lines.append(f"| {g['rank']} | {g['group']} | `{g['pattern']}` | {g['modules']} | {g['params']:,} | "
                     f"{mb(g['kept_bytes'])} -> {mb(g['quantized_bytes'])} | {score} |")
    if r["not_candidates"]:
        lines += ["", "Never quantized here: " + ", ".join(f"{g['group']} ({g['note']})" for g in r["not_candidates"])]
    b = r["bytes"]
    size = (f"Checkpoint about {mb(b['checkpoint'])} MiB (unquantized {mb(b['unquantized_checkpoint'])} MiB): quantized "
            f"modules {mb(b['quantized_modules'])} MiB, unquantized modules {mb(b['kept_modules'])} MiB, other tensors "
            f"{mb(b['other'])} MiB.")
    if local:
        return "\n".join(lines + ["", f"Suggested list: the top {r['kept_top']} group(s) kept unquantized "
                                  "(sensitivity.max_groups), the rest quantized. " + size, "", "    " + r["override"]])
    lines += ["", f"Greedy search on {held['metric']} (unquantized {held['baseline']:.4f}, target "
              f"{100 * held['target_delta']:+.2f}%):", "",
              "| step | groups kept unquantized | metric | vs unquantized | checkpoint MiB |", "|---|---|---:|---:|---:|"]
    for i, st in enumerate(r["steps"]):
        kept = ", ".join(st["kept"]) or "none (every candidate quantized)"
        mark = " **(chosen)**" if i == r["chosen_step"] else ""
        lines.append(f"| {i} {st['phase']}{mark} | {kept} | {st['metric']:.4f} | {100 * st['rel_delta']:+.3f}% | "
                     f"{mb(st['checkpoint_bytes'])} |")
    ref = r["reference"]
    if ref:
        lines.append(f"| reference | scheme.ignore_layers={ref['ignore_layers']} | {ref['metric']:.4f} | "
                     f"{100 * ref['rel_delta']:+.3f}% | {mb(ref['checkpoint_bytes'])} |")
    lines += ["", ("Target met" if held["target_met"] else "Target NOT met (sensitivity.max_groups reached)")
              + f": {held['metric']} {held['final']:.4f} ({100 * held['rel_delta']:+.3f}%). " + size, "",
              "    " + r["override"]]
    return "\n".join(lines)
