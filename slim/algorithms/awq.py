"""``awq``: activation-aware weight quantization (Lin et al. 2023) as a per-layer ``prepare`` step, then RTN.

For each mapping of the layer (:mod:`slim.algorithms.awq_mappings`: a norm or Linear whose output feeds balance
Linears), per input channel ``s = x_mean^a / (w_mean^(1-a) + 1e-4)`` (``duo`` scaling; ``x_mean^a`` without it),
normalised by ``sqrt(max(s) * min(s))``, for ``a`` on a grid of ``algorithm.grid`` points; the chosen ``s``
minimises the mean squared error of the mapping's parent block output when its quantized balance Linears
compute with ``Q(W * s) / s`` (Q: the scheme's own weight numerics, ``Scheme.handler`` with the configured group
size, weight observer and group-scale dtype) on this layer's calibration inputs. The scales are then folded in:
the smooth module's output is divided by ``s`` (norm weight, or the Linear's rows and bias) and every balance
module's input channels are multiplied by ``s`` — every consumer, quantized or not: attention input projections,
dense/shared/routed experts' gate and up, and the MoE router (``mlp.gate``, never quantized), so routing is
unchanged up to floating-point rounding. The layer is observed afterwards: static FP8 input scales are those of
the smoothed activations.

This follows llm-compressor's ``AWQModifier`` (vllm-project/llm-compressor,
``src/llmcompressor/modifiers/transform/awq/base.py``, formerly ``modifiers/awq/base.py``): the same scale
formula and normalisation, grid (``duo_scaling`` true: identity first, then ``n-1`` duo points), weight means
(|W| over each quantization group's absmax, averaged over the quantized balance Linears' rows), loss (sum of
squared output error over all elements / element count) and rule that a mapping with no quantized balance
Linear, or no calibration rows, is left alone. Differences: the search quantizes weights only (not activations,
as the reference); per-tensor schemes use ``duo_scaling`` false (the reference refuses duo there); the error search
runs on the first ``algorithm.search_samples`` calibration samples (the reference: all), the means on all of them.

Across ranks: activation sums are fp64 per rank, gathered and added in rank order; the per-grid-point squared
errors likewise, over every rank's rows. Every rank therefore picks the same scales, and a single process picks
the same ones up to the fp64 rounding of a different summation order (far below fp32's resolution of the means;
the argmin can only differ where two grid points' errors agree to ~1e-16).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from functools import partial

import torch
from torch import nn

from slim.algorithms.awq_mappings import MAPPINGS, Resolved, resolve
from slim.algorithms.gptq import Solved
from slim.errors import SlimError
from slim.quant.observers import WEIGHT_OBSERVERS
from slim.quant.schemes import dequantize_weight
from slim.quant.types import QuantizedLinear

log = logging.getLogger(__name__)


def grid_points(n: int, duo: bool | str) -> list[tuple[float, bool]]:
    """(ratio, duo) pairs in search order; the first is always the identity (ratio 0 without duo scaling)."""
    if duo == "both":
        half = n // 2
        return [(i / (half - 1), d) for i in range(half) for d in (False, True)]
    if duo:
        return [(0.0, False)] + [(i / (n - 2), True) for i in range(n - 1)]
    return [(i / (n - 1), False) for i in range(n)]


def awq_scales(x_mean: torch.Tensor, w_mean: torch.Tensor | None, ratio: float, duo: bool,
               power_of_two: bool = False) -> torch.Tensor:
    """Per-channel scales [C] fp32 from the activation means and (duo) the weight means, as the reference."""
    if duo:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[torch.isinf(s) | torch.isnan(s)] = 1
    if power_of_two:  # W * s and w / s then round exactly in any float dtype: bit-exact function preservation
        s = torch.exp2(torch.round(torch.log2(s)))
    return s


def weight_mean(weights: list[torch.Tensor], group_size: int | None) -> torch.Tensor:
    """Per input channel, |W| over its quantization group's absmax, averaged over every row of ``weights``."""
    total, rows = None, 0
    for w in weights:
        a = w.detach().float().abs()
        chunks = a.reshape(-1, group_size or a.numel())
        a = (chunks / (chunks.amax(dim=1, keepdim=True) + 1e-6)).reshape(a.shape)
        part = a.sum(0, dtype=torch.float64)
        total = part if total is None else total + part
        rows += a.shape[0]
    return (total / rows).float()


def fake_quantize(ctx, weight: torch.Tensor) -> torch.Tensor:
    """The weight [out, in] fp32 as the scheme quantizes and dequantizes it (what the checkpoint would hold)."""
    codes, scale = ctx.scheme.handler.quantize(weight, WEIGHT_OBSERVERS[ctx.weight_observer], ctx.group_size,
                                               ctx.group_scale_dtype, None)
    q = QuantizedLinear(codes, scale, None, ctx.scheme.weight_bits, ctx.group_size if ctx.scheme.per_group else None)
    return dequantize_weight(q, torch.float32)


def merge_sums(dist, parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Elementwise sums over ranks of fp64 tensors, added in rank order (every rank gets the same values)."""
    gathered = dist.gather([p.cpu() for p in parts])
    return [sum((g[i] for g in gathered[1:]), gathered[0][i].clone()) for i in range(len(parts))]


def _keep_inputs(store: list, device: torch.device, _module, args, kwargs) -> None:
    """Forward pre-hook: one batch's call of a parent module, its activations moved to ``device``."""
    args = tuple(a.detach().to(device) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().to(device)
    store.append((args, kwargs))


def _accumulate(stat: list, _module, args) -> None:
    """Forward pre-hook on a mapping's first balance module: fp64 per-channel sum of |x| and the row count."""
    x = args[0].detach()
    part = x.abs().reshape(-1, x.shape[-1]).sum(0, dtype=torch.float64).cpu()
    stat[0] = part if stat[0] is None else stat[0] + part
    stat[1] += x.numel() // x.shape[-1]


@torch.no_grad()
def _run(parent: nn.Module, batch, device: torch.device) -> torch.Tensor:
    args, kwargs = batch
    args = tuple(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        kwargs = {**kwargs, "hidden_states": kwargs["hidden_states"].to(device)}
    out = parent(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class AWQ:
    """``awq``: smooth each layer before it is observed (module docstring), then quantize as RTN does.
    ``records``: one dict per smoothed mapping (layer, smooth module, chosen ratio, error before/after)."""

    name = "awq"

    def __init__(self, *_args, **_kwargs) -> None:
        self.records: list[dict] = []
        self.notes: dict[str, str] = {}  # this layer's smoothed targets -> their mapping's result, for modules.json

    # ---- the layer-loop protocol -------------------------------------------------------------------------------
    def prepare(self, ctx) -> set[str]:
        """Smooth ``ctx.layer``; returns the full names of the tensors whose values changed.

        One calibration pass: the first ``algorithm.search_samples`` samples with every active mapping's parent
        inputs kept (the error search's rows), then the others with activation sums only. The mappings are then
        searched and folded in order; smoothing preserves the layer's function, so the inputs kept before an
        earlier mapping was folded stay those of the smoothed layer (up to rounding), as in the reference."""
        mappings = MAPPINGS.get(ctx.adapter_name)
        if mappings is None:
            raise SlimError(f"algorithm=awq has no mappings for model family {ctx.adapter_name!r}; known: "
                            f"{', '.join(sorted(MAPPINGS))} (add them in slim/algorithms/awq_mappings.py)")
        targets = {n[len(ctx.prefix):] for n in ctx.targets}
        kinds = [[r for r in found if any(b in targets for b in r.balance)] for found in resolve(ctx.layer, mappings)]
        kinds = [k for k in kinds if k]
        if not kinds:
            return set()
        active = [r for k in kinds for r in k]
        search = _local_samples(ctx.dist, getattr(ctx.settings, "search_samples", None))
        inputs, stats = self._capture(ctx, active, search)
        # per mapping [C + 1]: the fp64 sum of |x| per channel, then the row count
        merged = merge_sums(ctx.dist, [torch.cat([torch.zeros(_width(r), dtype=torch.float64) if s[0] is None else s[0],
                                                  torch.tensor([float(s[1])], dtype=torch.float64)])
                                       for r, s in zip(active, stats)])
        means = {id(r): m for r, m in zip(active, merged)}
        changed: set[str] = set()
        done = []
        for kind in kinds:
            done += self._smooth(ctx, kind, [means[id(r)] for r in kind], inputs, targets, changed)
        if done:
            ratios = sorted(r["error_after"] / r["error_before"] for r in done if r["error_before"] > 0)
            log.info("%s: awq smoothed %d mapping(s); output error after/before: median %.3f, max %.3f",
                     ctx.prefix.rstrip("."), len(done), ratios[len(ratios) // 2] if ratios else 1.0,
                     ratios[-1] if ratios else 1.0)
        self.records += done
        self.notes = {f"{ctx.prefix}{b}": _note(r) for r in done for b in r["balance_names"] if b in targets}
        return changed

    def collect(self, targets: dict[str, nn.Linear]):
        return nullcontext()

    def apply(self, targets: dict[str, nn.Linear], observers: dict, rerun=None, wanted=None) -> dict[str, Solved]:
        """No codes to decide: every target is quantized by round to nearest (of its smoothed weight). The smoothed
        ones are returned without codes, as ``awq`` with their mapping's search result (modules.json, W&B)."""
        notes, self.notes = self.notes, {}
        return {n: Solved(None, None, "awq", note) for n, note in notes.items() if n in targets}

    # ---- one kind of mapping in one layer ----------------------------------------------------------------------
    def _smooth(self, ctx, kind: list[Resolved], merged: list[torch.Tensor], inputs: dict[str, list],
                targets: set[str], changed: set[str]) -> list[dict]:
        settings = ctx.settings
        duo = _duo(getattr(settings, "duo_scaling", "auto"), ctx.scheme.per_group)
        grid = grid_points(int(getattr(settings, "grid", 20)), duo)
        pow2 = bool(getattr(settings, "pow2_scales", False))
        device = next(ctx.layer.parameters()).device
        searched = []
        for r, m in zip(kind, merged):
            x_sum, count = m[:-1], float(m[-1])
            if count == 0:  # e.g. an expert no calibration token reached: left as it is
                searched.append(None)
                continue
            x_mean = (x_sum / count).float()
            searched.append(self._search(ctx, r, inputs.get(r.parent_name, []), x_mean, grid, pow2, targets, device))
        losses = merge_sums(ctx.dist, [s[1] for s in searched if s is not None])
        done, it = [], iter(losses)
        for r, s in zip(kind, searched):
            if s is None:
                continue
            candidates, _ = s
            total = next(it)  # [G, 2]: squared error sum, element count
            err = (total[:, 0] / total[:, 1].clamp(min=1)).tolist()
            best = min(range(len(err)), key=lambda i: (not err[i] < float("inf"), err[i]))  # first minimum
            if not err[best] < float("inf"):
                log.warning("%s%s: awq found no finite output error; left unsmoothed", ctx.prefix, r.smooth_name)
                continue
            self._fold(ctx, r, candidates[best], changed)
            ratio, use_duo = grid[best]
            done.append({"layer": ctx.prefix.rstrip("."), "smooth": r.smooth_name, "parent": r.parent_name,
                         "balance": len(r.balance), "balance_names": list(r.balance), "ratio": ratio, "duo": use_duo,
                         "error_before": err[0], "error_after": err[best]})
            log.debug("%s%s: ratio %.3f%s, output error %.4g -> %.4g", ctx.prefix, r.smooth_name, ratio,
                      " (duo)" if use_duo else "", err[0], err[best])
        return done

    def _capture(self, ctx, active: list[Resolved], search: int | None) -> tuple[dict[str, list], list[list]]:
        """Each mapping's activation sums over this rank's samples, and each parent's inputs, batch by batch, over
        its first ``search`` samples (None: all)."""
        inputs: dict[str, list] = {}
        stats = [[None, 0] for _ in active]
        handles = []
        try:
            for r, stat in zip(active, stats):
                handles.append(next(iter(r.balance.values())).register_forward_pre_hook(partial(_accumulate, stat)))
            for r in active:
                if r.parent_name not in inputs:
                    inputs[r.parent_name] = []
                    handles.append(r.parent.register_forward_pre_hook(
                        partial(_keep_inputs, inputs[r.parent_name], ctx.store_device), with_kwargs=True))
            ctx.run(slice(0, search))
            for h in handles[len(active):]:  # the rest of the samples: activation sums only
                h.remove()
            del handles[len(active):]
            if search is not None:
                ctx.run(slice(search, None))
        finally:
            for h in handles:
                h.remove()
        return inputs, stats

    @torch.no_grad()
    def _search(self, ctx, r: Resolved, batches: list, x_mean: torch.Tensor, grid, pow2: bool, targets: set[str],
                device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """This rank's squared output error per grid point [G, 2] (sum, elements), and each point's scales."""
        quantized = {n: m for n, m in r.balance.items() if n in targets}
        originals = {n: m.weight.detach().clone() for n, m in quantized.items()}
        reference = [_run(r.parent, b, device) for b in batches]
        w_mean = weight_mean(list(originals.values()), ctx.group_size if ctx.scheme.per_group else None)
        candidates, rows = [], []
        try:
            for ratio, use_duo in grid:
                s = awq_scales(x_mean.to(device), w_mean.to(device), ratio, use_duo, pow2)
                candidates.append(s)
                for n, m in quantized.items():
                    w = originals[n].float()
                    m.weight.data.copy_((fake_quantize(ctx, w * s) / s).to(m.weight.dtype))
                sq, elems = torch.zeros((), dtype=torch.float64), 0
                for b, ref in zip(batches, reference):
                    out = _run(r.parent, b, device)
                    sq += (out.float() - ref.float()).pow(2).sum(dtype=torch.float64).cpu()
                    elems += ref.numel()
                rows.append(torch.stack([sq, torch.tensor(float(elems), dtype=torch.float64)]))
        finally:
            for n, m in quantized.items():
                m.weight.data.copy_(originals[n])
        return candidates, torch.stack(rows)

    @staticmethod
    @torch.no_grad()
    def _fold(ctx, r: Resolved, s: torch.Tensor, changed: set[str]) -> None:
        """Balance modules' input channels times ``s``; the smooth module's output divided by ``s``."""
        for n, m in r.balance.items():
            m.weight.data.copy_((m.weight.float() * s.to(m.weight.device)).to(m.weight.dtype))
            changed.add(f"{ctx.prefix}{n}.weight")
        smooth = r.smooth
        sv = s.to(smooth.weight.device)
        w = smooth.weight.float()
        smooth.weight.data.copy_((w / sv if w.dim() == 1 else w / sv[:, None]).to(smooth.weight.dtype))
        changed.add(f"{ctx.prefix}{r.smooth_name}.weight")
        if getattr(smooth, "bias", None) is not None:
            smooth.bias.data.copy_((smooth.bias.float() / sv).to(smooth.bias.dtype))
            changed.add(f"{ctx.prefix}{r.smooth_name}.bias")


def _note(record: dict) -> str:
    """One mapping's search result, as modules.json's ``algorithm_note`` of each Linear it balanced."""
    duo = " duo" if record["duo"] else ""
    return (f"awq: scales from {record['smooth']} (ratio {record['ratio']:.2f}{duo}); {record['parent']} output "
            f"error {record['error_before']:.4g} -> {record['error_after']:.4g}")


def _local_samples(dist, search_samples: int | None) -> int | None:
    """How many of this rank's samples are among the first ``search_samples`` of the whole calibration set (rank
    ``r`` of ``w`` holds samples ``r, r + w, ...``): the search rows are the same whatever the number of ranks."""
    if search_samples is None:
        return None
    return len(range(dist.rank, search_samples, dist.world))


def _width(r: Resolved) -> int:
    return next(iter(r.balance.values())).weight.shape[1]


def _duo(setting, per_group: bool) -> bool | str:
    """``algorithm.duo_scaling``: auto = on for per-group weights, off per tensor (where the reference refuses it)."""
    value = str(setting).lower()
    if value == "auto":
        return per_group
    if value in ("true", "false"):
        return value == "true"
    if value == "both":
        return "both"
    raise SlimError(f"algorithm.duo_scaling={setting!r} is not valid; choose one of: auto, true, false, both")

