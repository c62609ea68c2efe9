"""The quantize stage's loop over decoder layers, one named step at a time:

    materialize -> prepare -> observe -> algorithm -> quantize + write -> propagate -> commit

``materialize`` reads the layer's weights from the checkpoint (streamed ones stay there, see
``slim.quantize.streamed_params``); ``prepare`` lets the algorithm change the layer before it is observed (AWQ
smooths it: the static input scales are then the smoothed activations'; the tensors it changed are written from
their new values); ``observe`` runs the calibration hidden states through it with input observers
on its target Linears (merged across ranks); ``algorithm`` lets the configured :mod:`slim.algorithms` entry change
the targets' weights; ``quantize`` quantizes the targets and writes every tensor of the layer
(:class:`slim.quantize.LayerQuantizer`); ``propagate`` feeds the quantized layer's outputs forward when
``calibration.propagate=quantized``; ``commit`` frees the layer and saves a resume point. Peak memory = one layer +
the calibration hidden states, whatever the model's depth.
"""

from __future__ import annotations

import logging
import statistics
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from slim.algorithms import ALGORITHMS, LayerAlgorithm, LayerContext
from slim.calibration.runner import LayerRunner, observe, route_all
from slim.distributed import Dist
from slim.errors import SlimError
from slim.export import CheckpointWriter
from slim.hostmem import release_free_heap
from slim.layout import layer_quantizer
from slim.models.adapters import ModelAdapter
from slim.models.checkpoint import CheckpointReader
from slim.models.materialize import materialize, release
from slim.models.simulated import SimQuantLinear, swap_in
from slim.models.input_scales import resolve_mode
from slim.quant.observers import ACTIVATION_OBSERVERS, MinMaxObserver
from slim.quant.schemes import Scheme
from slim.quantize import (
    LayerQuantizer,
    ModuleReport,
    QuantizeResult,
    check_group_sizes,
    kernel_path,
    streamed_params,
)
from slim.resume import LayerCommit, ResumeStore
from slim.targets import Selection

log = logging.getLogger(__name__)


def group_by_prefix(modules: dict[str, nn.Linear], prefixes: set[str]) -> dict[str, dict[str, nn.Linear]]:
    """{prefix: {name: module}} for the names that start with one of ``prefixes`` (each ends with a dot);
    one pass over the names, not one per layer (DeepSeek-R1 has ~45k expert projections in 61 layers)."""
    out: dict[str, dict[str, nn.Linear]] = {}
    for name, mod in modules.items():
        cut = name.find(".")
        while cut != -1 and name[: cut + 1] not in prefixes:
            cut = name.find(".", cut + 1)
        if cut != -1:
            out.setdefault(name[: cut + 1], {})[name] = mod
    return out


def take_samples(batches: list[torch.Tensor], samples: slice) -> list[torch.Tensor]:
    """The calibration samples ``samples`` (a slice over this rank's samples, in order) of batches [b, T, H], as
    views of them, in batches as they lie."""
    start, stop, step = samples.indices(sum(b.shape[0] for b in batches))
    if step != 1:
        raise ValueError("take_samples takes a contiguous slice")
    out, offset = [], 0
    for b in batches:
        lo, hi = max(start - offset, 0), min(stop - offset, b.shape[0])
        if lo < hi:
            out.append(b[lo:hi])
        offset += b.shape[0]
    return out


def log_expert_coverage(layer: str, observers: dict[str, MinMaxObserver]) -> None:
    """One line per MoE layer: calibration tokens per routed expert (min/median/max), experts without any."""
    tokens = sorted(o.tokens for n, o in observers.items() if ".experts." in n and n.endswith("gate_proj"))
    if tokens:
        log.info("%s: %d routed experts, tokens per expert min %d / median %d / max %d, %d without tokens",
                 layer, len(tokens), tokens[0], tokens[len(tokens) // 2], tokens[-1], tokens.count(0))


class LayerLoop:
    """The steps of one quantize stage (see module docstring); :func:`quantize_model` runs them in order."""

    def __init__(self, *, model, adapter: ModelAdapter, reader: CheckpointReader, writer: CheckpointWriter, fmt,
                 scheme: Scheme, input_ids: torch.Tensor | None, cfg, device: torch.device, selection: Selection,
                 dist: Dist, store: ResumeStore | None, hidden_device: torch.device,
                 algorithm: LayerAlgorithm):
        self.model, self.adapter, self.reader, self.writer = model, adapter, reader, writer
        self.scheme, self.cfg, self.device, self.dist, self.store = scheme, cfg, device, dist, store
        self.algorithm = algorithm
        self.calibrate = input_ids is not None
        self.input_ids = input_ids
        self.result = QuantizeResult(num_samples=int(input_ids.shape[0]) if self.calibrate else 0)
        self.targets = selection.targets
        # ownership by rank, or by writer slot when ``writer`` is a slim.layout.WriterGroup
        self.lq = layer_quantizer(writer, self.targets, dist.owns, dist.is_main, lambda w, owned, rest: LayerQuantizer(
            scheme, fmt, w, reader, cfg.scheme.group_size, cfg.scheme.weight_observer, self.result, owned, rest))
        self.lq.moe_input_scale = resolve_mode(cfg.export.moe_input_scale, getattr(fmt, "name", ""))
        self.propagate_quantized = self.calibrate and cfg.calibration.propagate == "quantized"
        self.runner = LayerRunner(model, device, hidden_device)
        self.layers = adapter.layers(model)
        self.by_layer = group_by_prefix(self.targets, {adapter.layer_prefix(i) for i in range(len(self.layers))})
        # calibration off on a CPU with the kernels: nothing runs a layer, so its block-FP8 weights are never
        # materialized (the torch path decodes whole tensors: in pieces on the writer thread it only contends)
        self.stream = kernel_path(self.calibrate, device.type)
        self.hidden: list[torch.Tensor] = []
        self.progress = None  # the layer loop's progress bar (quantize_model), which names each step

    # ---- before and after the decoder layers ------------------------------------------------------------------
    def head(self) -> None:
        """Embeddings (and whatever precedes layer 0): written unquantized; the calibration inputs of layer 0."""
        head = self.adapter.head_modules(self.model)
        for prefix, mod in head.items():
            materialize(mod, prefix, self.reader, self.device)
        self.hidden = self.runner.embed(self.input_ids, self.cfg.calibration.batch_size) if self.calibrate else []
        for prefix, mod in head.items():
            self.lq.write_rest(mod, prefix, set())
            release(mod)

    def resume(self, start: LayerCommit) -> int:
        """Continue after a commit point: its writer state, module reports and hidden states; the next layer."""
        self.writer.restore(start.writer)
        self.result.modules = [ModuleReport(**m) for m in start.modules]
        self.hidden = start.hidden
        log.info("resuming after layer %d of %d (commit in %s)", start.layer, len(self.layers), self.store.dir)
        return start.layer + 1

    def tail(self) -> None:
        """The final norm and lm_head: lm_head quantized only when a user chose to (its input: the normed output)."""
        tail = self.adapter.tail_modules(self.model)
        for prefix, mod in tail.items():
            materialize(mod, prefix, self.reader, self.device)
        tail_targets = {n: m for n, m in self.targets.items() if any(n + "." == p or n.startswith(p) for p in tail)}
        if tail_targets and not self.calibrate:
            self.lq.quantize(tail_targets, {n: MinMaxObserver() for n in tail_targets}, static=False)
        elif tail_targets:
            with torch.no_grad():
                normed = [self.model.model.norm(h.to(self.device)) for h in self.hidden]
            obs = {n: ACTIVATION_OBSERVERS[self.cfg.scheme.activation_observer]() for n in tail_targets}
            for n in tail_targets:
                for h in normed:
                    obs[n].update(h)
            self.dist.reduce_observers(obs)
            self.lq.quantize(tail_targets, obs, self.scheme.static_activations)
        for prefix, mod in tail.items():
            self.lq.write_rest(mod, prefix, set(tail_targets))
            release(mod)

    def extra_layers(self) -> None:
        """DeepSeek's multi-token-prediction layer: skipped with a log line, or copied through (model.copy_mtp)."""
        for p in self.adapter.extra_layer_prefixes(self.model.config):
            extra = [n for n in self.reader.names() if n.startswith(p) and not self.reader.is_aux(n)]
            if not extra:
                continue
            if self.cfg.model.copy_mtp and self.dist.is_main:
                log.info("copying %s* through unquantized (%d tensors, model.copy_mtp=true)", p, len(extra))
                for n in extra:
                    self.writer.add(n, self.reader.passthrough(n, self.model.dtype))
            else:
                log.info("skipping %s* (multi-token-prediction layer, not part of the main model; "
                         "model.copy_mtp=true copies it)", p)
                self.result.skipped_prefixes.append(p)

    # ---- one decoder layer --------------------------------------------------------------------------------------
    def materialize(self, layer: nn.Module, prefix: str) -> None:
        streamed = streamed_params(layer, prefix, self.reader) if self.stream else frozenset()
        materialize(layer, prefix, self.reader, self.device, skip=streamed)

    def prepare(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Linear]) -> set[str]:
        """The algorithm's change to the layer before it is observed; the full names of the tensors it changed."""
        if not self.calibrate:
            return set()

        def run(samples: slice = slice(None)) -> list[torch.Tensor]:
            with route_all(layer, self.cfg.calibration.route_all_experts):
                return self.runner.forward(layer, take_samples(self.hidden, samples), prefix.rstrip("."))

        return self.algorithm.prepare(LayerContext(
            layer=layer, prefix=prefix, targets=targets, run=run, scheme=self.scheme,
            group_size=self.cfg.scheme.group_size, weight_observer=self.cfg.scheme.weight_observer,
            group_scale_dtype=self.lq.group_scale_dtype, dist=self.dist, adapter_name=self.adapter.name,
            settings=self.cfg.algorithm, store_device=self.runner.store_device))

    def observe(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Linear]
                ) -> tuple[dict[str, MinMaxObserver], list[torch.Tensor]]:
        """The layer's calibration forward pass with input observers (merged across ranks) and the algorithm's
        collection; weights only: observers that saw nothing (no input scale, no output error)."""
        if not self.calibrate:
            return {n: MinMaxObserver() for n in targets}, []
        with observe(targets, self.cfg.scheme.activation_observer) as obs, \
                route_all(layer, self.cfg.calibration.route_all_experts), self.algorithm.collect(targets):
            outputs = self.runner.forward(layer, self.hidden, prefix.rstrip("."))
        self.dist.reduce_observers(obs)
        log_expert_coverage(prefix.rstrip("."), obs)
        return obs, outputs

    def run_algorithm(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Linear],
                      obs: dict[str, MinMaxObserver]) -> dict:
        """The algorithm's codes and scales per target (none for rtn); ``rerun`` repeats the calibration forward
        pass for algorithms that collect in several passes (GPTQ's expert chunks)."""
        if not self.calibrate:
            return {}

        def rerun() -> None:
            with route_all(layer, self.cfg.calibration.route_all_experts):
                self.runner.forward(layer, self.hidden, prefix.rstrip("."))

        return self.algorithm.apply(targets, obs, rerun=rerun, wanted=None if self.propagate_quantized
                                    else self.lq.owned)

    def quantize_and_write(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Linear],
                           obs: dict[str, MinMaxObserver], changed: set[str] = frozenset(),
                           solved: dict | None = None) -> dict:
        """The rest first: with background writes its bytes go to disk while the targets are quantized; streamed
        targets' kernels are queued before it, so they run while this thread writes the rest. ``changed``: tensors
        ``prepare`` changed, written from their values (see ``LayerQuantizer.write_rest``)."""
        self.lq.start(targets, everything=self.propagate_quantized)
        self.lq.write_rest(layer, prefix, set(targets), changed)
        return self.lq.quantize(targets, obs, self.scheme.static_activations, everything=self.propagate_quantized,
                                solved=solved)

    def propagate(self, layer: nn.Module, prefix: str, targets: dict[str, nn.Linear], qs: dict) -> list[torch.Tensor]:
        """Layer i+1 sees the quantized layer i (``calibration.propagate=quantized``)."""
        originals = {n: swap_in(self.model, n, SimQuantLinear(q, targets[n].bias)) for n, q in qs.items()}
        outputs = self.runner.forward(layer, self.hidden, prefix.rstrip("."))
        for n, m in originals.items():
            swap_in(self.model, n, m)
        return outputs

    def commit(self, i: int, layer: nn.Module) -> None:
        """Free the layer, wait for its writes, hand freed heap back, and save a resume point when one is due."""
        release(layer)
        self.reader.close()
        self.writer.maybe_flush()  # waits for the layer's queued writes, whose tensors are then freed too
        if self.device.type == "cpu":
            release_free_heap()  # the layer's freed heap pages go back: memory stays one layer at any depth
        last = i == len(self.layers) - 1
        if self.store is not None and ((i + 1) % self.cfg.export.commit_every == 0 or last):
            # vars(): the reports are flat, so asdict's deep copies would only cost time at every commit
            self.store.save_layer(i, self.writer.state(), [vars(m) for m in self.result.modules], self.hidden)
            self.dist.barrier()  # every rank's part is on disk before the commit names this layer
            if self.dist.is_main:
                self.store.commit(i)

    def step(self, name: str) -> None:
        """The progress bar names the step the current layer is in."""
        if self.progress is not None:
            self.progress.set_postfix_str(name, refresh=False)

    def layer(self, i: int) -> None:
        t0 = time.perf_counter()
        layer, prefix = self.layers[i], self.adapter.layer_prefix(i)
        targets = self.by_layer.get(prefix, {})
        self.step("materialize")
        self.materialize(layer, prefix)
        self.step("prepare")
        changed = self.prepare(layer, prefix, targets)
        self.step("observe")
        obs, outputs = self.observe(layer, prefix, targets)
        self.step(self.algorithm.name)
        solved = self.run_algorithm(layer, prefix, targets, obs)
        self.step("quantize")
        qs = self.quantize_and_write(layer, prefix, targets, obs, changed, solved)
        del solved
        if self.propagate_quantized:
            outputs = self.propagate(layer, prefix, targets, qs)
        self.hidden = outputs
        del qs, outputs
        self.commit(i, layer)
        self.result.layer_seconds[prefix.rstrip(".")] = round(time.perf_counter() - t0, 4)


def quantize_model(
    *, model, adapter: ModelAdapter, reader: CheckpointReader, writer: CheckpointWriter, fmt, scheme: Scheme,
    input_ids: torch.Tensor | None, cfg, device: torch.device, selection: Selection, dist: Dist | None = None,
    store: ResumeStore | None = None, start: LayerCommit | None = None, hidden_device: torch.device | None = None,
    algorithm: LayerAlgorithm | None = None,
) -> QuantizeResult:
    """Stream, calibrate, quantize and write the whole model. ``cfg`` is the full SlimConfig.

    ``input_ids=None`` is calibration off: no forward pass, weights only (dynamic-activation schemes).
    With several ranks, ``input_ids`` is this rank's slice of the calibration set; observers are merged
    across ranks before any scale is computed, and each rank writes the quantized modules it owns.
    With ``store``, a commit point is saved every ``cfg.export.commit_every`` layers; ``start`` continues
    after such a commit. ``hidden_device``: where the calibration hidden states wait between layers (default
    ``device``; the host when the plan finds they do not fit on the device). ``algorithm``: the per-layer step
    (default ``rtn``).
    """
    dist = dist or Dist()
    if input_ids is None and scheme.static_activations:
        raise SlimError(f"{scheme.name} needs static activation scales: calibrate (calibration=embedded) or "
                        "choose a dynamic-activation scheme")
    _log_selection(selection)
    if scheme.per_group:
        check_group_sizes(selection.targets, cfg.scheme.group_size)
    loop = LayerLoop(model=model, adapter=adapter, reader=reader, writer=writer, fmt=fmt, scheme=scheme,
                     input_ids=input_ids, cfg=cfg, device=device, selection=selection, dist=dist, store=store,
                     hidden_device=hidden_device or device, algorithm=algorithm or ALGORITHMS["rtn"]())
    result = loop.result
    result.ignored, result.ignore_matches = sorted(selection.ignored), selection.matches
    if start is None:
        loop.head()
        first = 0
    else:
        first = loop.resume(start)
    if loop.calibrate:
        _log_hidden(loop, hidden_device or device)
    progress = tqdm(range(first, len(loop.layers)), desc=f"quantize layers ({loop.algorithm.name})", unit="layer",
                    leave=False, initial=first, total=len(loop.layers))
    loop.progress = progress
    for i in progress:
        loop.layer(i)
    if result.layer_seconds:
        secs = list(result.layer_seconds.values())
        log.info("%d decoder layers in %.1f s (median %.2f s per layer)", len(secs), sum(secs), statistics.median(secs))
    loop.tail()
    loop.extra_layers()
    order = {n: i for i, n in enumerate(sorted(selection.targets))}
    result.modules = sorted((m for part in dist.gather(result.modules) for m in part), key=lambda m: order[m.name])
    return result


def _log_selection(selection: Selection) -> None:
    """One line per ignore_layers pattern: how many modules it matched, and the first."""
    for pattern, names in selection.matches.items():
        log.info("ignore_layers %r matched %d module(s): %s", pattern, len(names),
                 names[0] + (" ..." if len(names) > 1 else ""))


def _log_hidden(loop: LayerLoop, hidden_device: torch.device) -> None:
    where = "in host memory" if hidden_device.type == "cpu" else f"on {hidden_device}"
    if hidden_device != loop.device:
        where += f" (they do not fit on {loop.device}; each batch visits it for its forward pass)"
    log.info("calibration hidden states: %d samples x %d tokens x %d, %.1f MiB, kept %s between layers",
             loop.input_ids.shape[0], loop.input_ids.shape[1], loop.hidden[0].shape[-1],
             sum(h.numel() * h.element_size() for h in loop.hidden) / 2**20, where)
