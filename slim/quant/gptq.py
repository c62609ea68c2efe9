"""GPTQ (Frantar et al. 2022) as pure numerics: quantize weights column by column, each column's rounding error
spread over the columns not yet quantized through the inverse Hessian of the layer's inputs.

Batched: ``W`` [B, R, C] and ``H`` [B, C, C] hold B independent problems of one shape (e.g. one layer's routed
experts); Linears that share an input share one H and are solved as one problem, their rows concatenated. The
steps follow llm-compressor (``src/llmcompressor/modifiers/gptq/gptq_quantize.py`` and ``helpers.py``,
``factorize_hessian``) and GPTQModel:

- dead columns (``H[j, j] == 0``: an input channel that was always zero) get ``H[j, j] = 1`` and weight 0;
- dampening: ``dampening_frac * mean(diag(H))`` added to the diagonal; where the Cholesky factorization still
  fails, retried with 10x the fraction up to ``retries`` times (GPTQModel's damp increments), then the problem is
  reported as not solved (``ok[b] = False``: the caller falls back to round to nearest);
- ``Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)``;
- lazy block updates: within a block of ``block_size`` columns each column's error updates the block's later
  columns at once; the rest of the matrix is updated once per block (``W[:, :, i2:] -= Err1 @ Hinv[i1:i2, i2:]``).

Grids: int4 per group (slim's rule: ``group_scale`` is the scheme's own scale function, incl. rounding to the
format's group-scale dtype, applied to the *current updated* weights of the group when its first column comes, or
fixed ``scales`` given up front as llm-compressor does) or FP8 with one tensor scale fixed up front. Codes are
``clamp(round(w / s), -8, 7)`` / ``fp8(clamp(w / s))`` exactly as :mod:`slim.quant.int4` / :mod:`slim.quant.fp8`
compute them, so the codes and scales returned are what RTN code would read back.

Activation order without a stored permutation ("static groups": GPTQModel's ``desc_act`` with ``static_groups``,
llm-compressor's ``actorder="weight"``): the columns are solved in decreasing order of H's diagonal (the input
channels with the most energy first, while the most columns are left to absorb their error), every group's scale
fixed up front from the weights in their original order, and the codes put back in that order. The groups stay
contiguous in the checkpoint, so nothing (no ``g_idx``) is stored: :func:`activation_order`,
:func:`permute_columns`, :func:`permute_hessian`, :func:`unpermute_columns` and ``gptq_solve(column_groups=)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from slim.quant import fp8, int4


@dataclass(frozen=True)
class Grid:
    """What one column becomes: ``encode(w [B, R], s [B, R] fp32) -> codes`` (int4: their values as fp32, FP8: fp8),
    ``decode(codes, s) -> fp32``; ``code_dtype``: what the codes are returned as; ``group_size`` None: one scale per
    row of a problem, fixed up front."""

    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    decode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    work_dtype: torch.dtype  # what ``encode`` returns (a block of columns is kept in it)
    code_dtype: torch.dtype
    group_size: int | None


def int4_grid(group_size: int) -> Grid:
    """``clamp(round(w / s), -8, 7)`` with ``s`` the group scale as stored (slim.quant.int4.round_groups)."""
    return Grid(encode=lambda w, s: torch.div(w, s).round_().clamp_(int4.INT4_MIN, int4.INT4_MAX),
                decode=torch.mul, work_dtype=torch.float32, code_dtype=torch.int8, group_size=group_size)


def fp8_grid() -> Grid:
    """``fp8(clamp(w / s, -448, 448))`` (slim.quant.fp8.quantize_fp8); decoded by torch's exact cast."""
    return Grid(encode=fp8.quantize_fp8, decode=lambda c, s: c.float().mul_(s), work_dtype=fp8.FP8_DTYPE,
                code_dtype=fp8.FP8_DTYPE, group_size=None)


def inverse_hessian_factor(hessian: torch.Tensor, weight: torch.Tensor, dampening_frac: float, retries: int = 2
                           ) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """H [B, C, C] fp32 (consumed) -> (upper Cholesky factor of H^-1 [B, C, C], ok [B] bool, dampening fraction
    used per problem). Dead columns are zeroed in ``weight`` [B, R, C] in place."""
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1)  # [B, C], a view
    dead = diag == 0
    if dead.any():
        diag.masked_fill_(dead, 1.0)
        weight.masked_fill_(dead.unsqueeze(1), 0)
    out = torch.empty_like(hessian)
    ok = torch.zeros(hessian.shape[0], dtype=torch.bool)
    used: list[float] = []
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    for b in range(hessian.shape[0]):
        h, frac = hessian[b], dampening_frac
        for attempt in range(retries + 1):
            frac = dampening_frac * 10**attempt
            damped = h + eye * (frac * torch.mean(torch.diag(h)))
            factor, info = torch.linalg.cholesky_ex(damped)
            if int(info) == 0:
                factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
            if int(info) == 0 and bool(torch.isfinite(factor).all()):
                out[b], ok[b] = factor, True
                break
        else:
            out[b] = eye
        used.append(frac)
    return out, ok, used


@torch.no_grad()
def gptq_solve(
    weight: torch.Tensor,  # [B, R, C] fp32, consumed (updated in place)
    hinv: torch.Tensor,  # [B, C, C] upper Cholesky factor of H^-1 (inverse_hessian_factor)
    grid: Grid,
    *,
    block_size: int = 128,
    group_scale: Callable[[torch.Tensor], torch.Tensor] | None = None,  # [N, g] fp32 -> [N] scales
    scales: torch.Tensor | None = None,  # fixed up front: [B, R, C // g] per group; [B, 1] or [B, R] per tensor
    column_groups: torch.Tensor | None = None,  # [B, C] int64: each (permuted) column's group in ``scales``
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes [B, R, C] of ``grid.code_dtype``, scales [B, R, C // g] or [B, 1]). Per group, the scale is
    ``group_scale`` of the group's current weights when its first column comes, unless ``scales`` fixes them.
    ``column_groups``: the columns come permuted (activation order); column c is coded with the fixed scale of
    group ``column_groups[:, c]``."""
    B, R, C = weight.shape
    g = grid.group_size
    if column_groups is not None:
        if g is None or scales is None:
            raise ValueError("column_groups needs a per-group grid and its scales fixed up front")
    elif g is not None and not (block_size % g == 0 or g % block_size == 0):
        raise ValueError(f"GPTQ block_size {block_size} and group_size {g}: one must divide the other")
    if g is None and scales is None:
        raise ValueError("a per-tensor grid needs its scales fixed up front")
    codes = torch.empty((B, R, C), dtype=grid.code_dtype, device=weight.device)
    out_scales = scales
    s = None if g is not None else (scales if scales.shape == (B, R) else scales.reshape(B, 1).expand(B, R)).float()
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        w1 = weight[:, :, i1:i2].clone()  # the block's current weights
        err1 = torch.empty_like(w1)
        q1 = torch.empty(w1.shape, dtype=grid.work_dtype, device=weight.device)
        hinv1 = hinv[:, i1:i2, i1:i2]
        if column_groups is not None:  # every column's fixed scale in this block, gathered once
            block_scales = torch.gather(scales, 2, column_groups[:, i1:i2].unsqueeze(1).expand(B, R, i2 - i1)).float()
        for i in range(i2 - i1):
            c = i1 + i
            if column_groups is not None:
                s = block_scales[:, :, i]
            elif g is not None and c % g == 0:
                if scales is not None:
                    s_stored = scales[:, :, c // g]
                else:  # the group's current weights: inside this block, or from here on (a block starts here)
                    src = w1[:, :, i : i + g] if i + g <= i2 - i1 else weight[:, :, c : c + g]
                    s_stored = group_scale(src.reshape(B * R, g)).reshape(B, R)
                    if out_scales is None:  # in the dtype the rule returns (the format's scale dtype)
                        out_scales = torch.empty((B, R, C // g), dtype=s_stored.dtype, device=weight.device)
                    out_scales[:, :, c // g] = s_stored
                s = s_stored.float()
            w = w1[:, :, i]
            code = q1[:, :, i] = grid.encode(w, s)
            e = (w - grid.decode(code, s)).div_(hinv1[:, i, i].unsqueeze(1))  # [B, R]
            w1[:, :, i:] -= e.unsqueeze(-1) * hinv1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = e
        codes[:, :, i1:i2] = q1.to(grid.code_dtype)
        if i2 < C:
            weight[:, :, i2:] -= torch.bmm(err1, hinv[:, i1:i2, i2:])
    return codes, out_scales


def activation_order(hessian: torch.Tensor) -> torch.Tensor:
    """H [B, C, C] -> [B, C] int64: the columns by decreasing diagonal (ties keep their index order)."""
    return torch.argsort(torch.diagonal(hessian, dim1=-2, dim2=-1), dim=-1, descending=True, stable=True)


def permute_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t [B, R, C], perm [B, C] -> t[b][:, perm[b]] for every b."""
    return torch.gather(t, 2, perm.unsqueeze(1).expand(-1, t.shape[1], -1))


def unpermute_columns(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`permute_columns` (FP8 codes moved as their bytes)."""
    raw = t.view(torch.uint8) if t.dtype == fp8.FP8_DTYPE else t
    out = torch.empty_like(raw).scatter_(2, perm.unsqueeze(1).expand(-1, t.shape[1], -1), raw)
    return out.view(t.dtype)


def permute_hessian(hessian: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """H [B, C, C], perm [B, C] -> H[b][perm[b]][:, perm[b]] for every b (a new tensor)."""
    C = hessian.shape[-1]
    rows = torch.gather(hessian, 1, perm.unsqueeze(2).expand(-1, -1, C))
    return torch.gather(rows, 2, perm.unsqueeze(1).expand(-1, C, -1))


def hessian_objective(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T) for W, Q [R, C], H [C, C]: the layer-output error GPTQ minimises (fp64)."""
    d = (weight - dequantized).double()
    return float(torch.einsum("rc,cd,rd->", d, hessian.double(), d))
