"""``gptq``: per target Linear, H = 2/n X^T X of its calibration inputs, then :func:`slim.quant.gptq.gptq_solve`.

Collection (``collect``): a forward pre-hook per target adds x^T x (fp32, on the compute device) to the Hessian of
its *input*: Linears called on the same tensor object (gate/up of an expert or a dense MLP, q_a/kv_a of MLA; with
``calibration.route_all_experts`` every routed expert of a layer) share one H, and are solved as one problem with
their rows concatenated. Routed experts get one H each from the tokens routed to them.

Memory: the routed experts' Hessians of a layer are collected ``expert_chunk`` experts at a time (0: all at once);
each further chunk reruns the layer's calibration forward pass (``rerun``), so at most one chunk's Hessians are held
(``slim.plan`` picks the chunk that fits the device). Ranks: each rank's sums are all-gathered and added in rank
order (``Dist.sum_in_rank_order``), so every rank solves the same H, run after run.

Fallbacks to round to nearest (never a crash), recorded per module: fewer than ``min_tokens`` tokens (routed
experts that saw none included), or an H that stays not positive definite after raising the dampening.
"""

from __future__ import annotations

import contextlib
import logging
import re
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from slim.quant import gptq as solver
from slim.quant.observers import WEIGHT_OBSERVERS
from slim.quant.schemes import dequantize_weight
from slim.quant.types import QuantizedLinear

log = logging.getLogger(__name__)
EXPERT_ID = re.compile(r"\.experts\.(\d+)\.")
RECENT_INPUTS = 8  # inputs remembered to find Linears that share one (q_b runs between q_a and kv_a)
SOLVE_BATCH_BYTES = 1 << 30  # weights + H^-1 (fp32) of the problems solved in one batch


@dataclass
class Solved:
    """What the algorithm decided for one target. ``weight``/``weight_scale``: the codes and scales to write as
    they are (None: quantize by round to nearest); ``algorithm``: ``gptq`` | ``rtn-fallback``; ``reason``: why a
    fallback; output errors (||y_q - y|| / ||y|| on the observer's sample rows, unquantized inputs) before/after."""

    weight: torch.Tensor | None
    weight_scale: torch.Tensor | None
    algorithm: str
    reason: str = ""
    rtn_output_rel_err: float | None = None
    output_rel_err: float | None = None


def block_for(block_size: int, group_size: int | None) -> int:
    """The lazy-update block GPTQ runs with: ``algorithm.block_size`` where it and the group size divide one another
    (each group's scale is then fixed from weights every earlier block has updated), else the group size."""
    if group_size is None or block_size % group_size == 0 or group_size % block_size == 0:
        return block_size
    return group_size


class GPTQ:
    """``gptq`` (see module docstring); ``ctx``: :class:`slim.algorithms.AlgorithmContext`."""

    name = "gptq"

    def __init__(self, ctx):
        self.ctx, self.cfg = ctx, ctx.cfg
        self.per_group = ctx.scheme.per_group
        self.dtype = getattr(torch, self.cfg.hessian_dtype)  # what x^T x is summed in
        # FP8 per-tensor weights: GPTQ only with algorithm.fp8_weights (docs/algorithms.md has the measurement)
        self.active = self.per_group or bool(self.cfg.fp8_weights)
        if not self.active:
            log.info("algorithm=gptq: %s has FP8 per-tensor weights, which stay round to nearest "
                     "(algorithm.fp8_weights=true runs GPTQ on them)", ctx.scheme.name)
        self._reset()

    def _reset(self) -> None:
        self.hessian: dict[str, torch.Tensor] = {}  # group key (its first member) -> sum of x^T x
        self.tokens: dict[str, int] = {}
        self.group_of: dict[str, str] = {}  # target -> group key
        self.recent: list[tuple[weakref.ref, str]] = []

    # ---- collection ---------------------------------------------------------------------------------------------
    def chunks(self, targets: dict[str, nn.Linear]) -> list[list[str]]:
        """Pass 0: the non-expert targets and the first ``expert_chunk`` routed experts; then one per chunk."""
        ids = {n: int(m.group(1)) for n in targets if (m := EXPERT_ID.search(n))}
        size = self.ctx.expert_chunk or (max(ids.values(), default=0) + 1)
        passes: dict[int, list[str]] = {}
        for n in targets:
            passes.setdefault(ids[n] // size if n in ids else 0, []).append(n)
        return [passes[k] for k in sorted(passes)]

    def _hook(self, name: str) -> Callable:
        def hook(_mod, args):
            x = args[0]
            hit = next((k for ref, k in self.recent if ref() is x), None)
            key = self.group_of.setdefault(name, hit if hit is not None else name)
            if hit == key or x.numel() == 0:
                return
            rows = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            h = self.hessian.get(key)
            if h is None:
                h = self.hessian[key] = torch.zeros(x.shape[-1], x.shape[-1], dtype=self.dtype, device=x.device)
            h.addmm_(rows.t(), rows)
            self.tokens[key] = self.tokens.get(key, 0) + rows.shape[0]
            self.recent = [*self.recent[-(RECENT_INPUTS - 1):], (weakref.ref(x), key)]
        return hook

    @contextlib.contextmanager
    def hooks(self, targets: dict[str, nn.Linear], names: list[str]) -> Iterator[None]:
        handles = [targets[n].register_forward_pre_hook(self._hook(n)) for n in names]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
            self.recent = []

    def prepare(self, ctx) -> set[str]:
        """Nothing to change before observing (``awq_gptq`` smooths first: slim.algorithms.Composed)."""
        return set()

    @contextlib.contextmanager
    def collect(self, targets: dict[str, nn.Linear]) -> Iterator[None]:
        self._reset()
        passes = self.chunks(targets) if self.active else []
        with self.hooks(targets, passes[0] if passes else []):
            yield

    # ---- solving ------------------------------------------------------------------------------------------------
    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun: Callable[[], object] | None = None,
              wanted: set[str] | None = None) -> dict[str, Solved]:
        """Solve the pass collected by ``collect``, then each further expert chunk (reruns the forward pass).
        ``wanted``: the targets whose result this rank needs (default all); every rank joins every reduction."""
        out: dict[str, Solved] = {}
        passes = self.chunks(targets) if self.active else []
        for i, names in enumerate(passes):
            if i:
                if rerun is None:
                    raise RuntimeError("GPTQ with algorithm.expert_chunk needs the layer's forward pass to rerun")
                self._reset()
                with self.hooks(targets, names):
                    rerun()
            self._solve_pass(targets, observers, names, wanted, out)
            self._reset()
        self._log(targets, out)
        return out

    def _solve_pass(self, targets, observers, names, wanted, out) -> None:
        self._reduce(targets)
        groups: dict[str, list[str]] = {}
        for n in names:
            key = self.group_of.get(n)
            if key is None:
                out[n] = Solved(None, None, "rtn-fallback", "no calibration token")
            else:
                groups.setdefault(key, []).append(n)
        todo = []
        for key, members in sorted(groups.items()):
            tokens = self.tokens.get(key, 0)
            if tokens < max(self.cfg.min_tokens, 1):
                reason = f"{tokens} tokens < algorithm.min_tokens {self.cfg.min_tokens}" if tokens \
                    else "no calibration token"
                for n in members:
                    out[n] = Solved(None, None, "rtn-fallback", reason)
            elif wanted is None or any(n in wanted for n in members):
                todo.append((key, members))
            else:
                self.hessian.pop(key, None)
        # problems of one shape are solved as one batch (one layer's routed experts)
        by_shape: dict[tuple, list] = {}
        for key, members in todo:
            shape = (targets[members[0]].in_features, tuple(targets[n].out_features for n in members))
            by_shape.setdefault(shape, []).append((key, members))
        for (cols, rows), items in by_shape.items():
            per = (cols * cols + sum(rows) * cols) * 4 * 3
            step = max(1, SOLVE_BATCH_BYTES // per)
            for b in range(0, len(items), step):
                self._solve_batch(targets, observers, items[b : b + step], out)

    def _solve_batch(self, targets, observers, items, out) -> None:
        ctx = self.ctx
        hess = torch.stack([(self.hessian.pop(key) * (2.0 / self.tokens[key])).float()
                            for key, _ in items])  # [B, C, C] fp32
        weight = torch.stack([torch.cat([targets[n].weight.detach().float() for n in members])
                              for _, members in items]).to(hess.device)  # [B, R, C]
        original = weight.clone()
        perm = solver.activation_order(hess) if self.cfg.actorder == "static" else None
        if perm is not None:  # solved in activation order, written in the original one (nothing stored)
            hess, weight = solver.permute_hessian(hess, perm), solver.permute_columns(weight, perm)
        hinv, ok, damp = solver.inverse_hessian_factor(hess, weight, self.cfg.dampening_frac,
                                                       self.cfg.dampening_retries)
        del hess
        observe = WEIGHT_OBSERVERS[ctx.weight_observer]
        if self.per_group:
            g = ctx.group_size
            grid = solver.int4_grid(g)

            def group_scale(w: torch.Tensor) -> torch.Tensor:  # the scheme's own rule, scale dtype included
                return ctx.scheme.handler.quantize(w, observe, g, ctx.scale_dtype, None)[1].reshape(-1)

            if perm is None:
                codes, scales = solver.gptq_solve(weight, hinv, grid, block_size=block_for(self.cfg.block_size, g),
                                                  group_scale=group_scale)
            else:  # every group's scale fixed up front from its weights (dead columns zeroed), original order
                B, R, C = weight.shape
                scales = group_scale(solver.unpermute_columns(weight, perm).reshape(-1, g)).reshape(B, R, C // g)
                codes, _ = solver.gptq_solve(weight, hinv, grid, block_size=self.cfg.block_size, scales=scales,
                                             column_groups=perm // g)
        else:  # one scale per Linear, from its weight as RTN computes it, fixed up front
            grid = solver.fp8_grid()
            row_scales = torch.stack([torch.cat([
                ctx.scheme.handler.quantize(targets[n].weight.detach().float(), observe, None, None, None)[1]
                .to(weight.device).expand(targets[n].out_features) for n in members]) for _, members in items])
            codes, scales = solver.gptq_solve(weight, hinv, grid, block_size=self.cfg.block_size, scales=row_scales)
        if perm is not None:
            codes = solver.unpermute_columns(codes, perm)
        for b, (_, members) in enumerate(items):
            if not ok[b]:
                for n in members:
                    out[n] = Solved(None, None, "rtn-fallback",
                                    f"H not positive definite with dampening up to {damp[b]:g}")
                continue
            r = 0
            for n in members:
                rows = targets[n].out_features
                scale = scales[b, r : r + rows] if self.per_group else scales[b, r : r + 1]
                out[n] = self._solved(n, targets[n], codes[b, r : r + rows].clone(), scale.clone(),
                                      original[b, r : r + rows], observers)
                r += rows

    def _solved(self, name, mod, codes, scale, weight, observers) -> Solved:
        """The result, with the output error of RTN and of GPTQ on the observer's sample rows (weights only)."""
        ctx = self.ctx
        if not self.per_group:
            scale = scale.reshape(1)
        sample = getattr(observers.get(name), "sample", None)
        rtn_err = gptq_err = None
        if sample is not None and sample.numel():
            x = sample.float().to(weight.device)
            ref = F.linear(x, weight)
            norm = max(float(torch.linalg.vector_norm(ref)), 1e-30)
            gs = ctx.group_size if self.per_group else None
            rtn = ctx.scheme.handler.quantize(weight, WEIGHT_OBSERVERS[ctx.weight_observer], gs, ctx.scale_dtype, None)
            for qw, which in ((rtn, "rtn"), ((codes, scale), "gptq")):
                q = QuantizedLinear(qw[0], qw[1], None, ctx.scheme.weight_bits, gs)
                err = float(torch.linalg.vector_norm(F.linear(x, dequantize_weight(q, torch.float32)) - ref)) / norm
                rtn_err, gptq_err = (err, gptq_err) if which == "rtn" else (rtn_err, err)
        # the layer's results wait in host memory for the writer (a byte per weight: on a device they would add half
        # the bf16 layer to its peak); slim.plan counts them there
        return Solved(codes.cpu(), scale.cpu(), "gptq", rtn_output_rel_err=rtn_err, output_rel_err=gptq_err)

    def _reduce(self, targets: dict[str, nn.Linear]) -> None:
        """Every rank's sums and token counts, added in rank order (the same H on every rank, run after run)."""
        dist = self.ctx.dist
        if dist is None or dist.world == 1:
            return
        merged: dict[str, str] = {}
        for part in dist.gather(dict(self.group_of)):
            for n, k in part.items():
                merged.setdefault(n, k)
        self.group_of = merged
        shapes = {k: n for n, k in merged.items()}
        for key in sorted(set(merged.values())):
            local = self.hessian.get(key)
            if local is None:
                size = targets[shapes[key]].in_features
                local = torch.zeros(size, size, dtype=self.dtype, device=dist.device)
            self.hessian[key] = dist.sum_in_rank_order(local.to(dist.device))
        keys = sorted(set(merged.values()))
        counts = dist.sum_in_rank_order(torch.tensor([float(self.tokens.get(k, 0)) for k in keys],
                                                     dtype=torch.float64, device=dist.device))
        self.tokens = {k: int(c) for k, c in zip(keys, counts.tolist())}

    def _log(self, targets, out: dict[str, Solved]) -> None:
        if not out:
            return
        done = [s for s in out.values() if s.algorithm == "gptq"]
        fallbacks = {n: s.reason for n, s in out.items() if s.algorithm != "gptq"}
        for n, s in out.items():
            if s.output_rel_err is not None:
                log.debug("%s: output error rtn %.4g -> gptq %.4g", n, s.rtn_output_rel_err, s.output_rel_err)
        errs = [(s.rtn_output_rel_err, s.output_rel_err) for s in done if s.output_rel_err is not None]
        layer = min(out).split(".mlp.")[0].split(".self_attn.")[0]
        msg = f"{layer}: gptq on {len(done)} of {len(out)} modules, {len(fallbacks)} fell back to rtn"
        if fallbacks:
            first = min(fallbacks)
            msg += f" (e.g. {first}: {fallbacks[first]})"
        if errs:
            msg += (f"; output error on the sample rows, mean over modules: rtn {sum(e[0] for e in errs) / len(errs):.4g}"
                    f" -> gptq {sum(e[1] for e in errs) / len(errs):.4g}")
        log.info(msg)
