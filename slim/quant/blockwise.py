"""Quantize a weight a block of rows at a time: the bytes of ``Scheme.quantize`` on the whole tensor, with
temporaries the size of one block.

Every int4 group lies within a row, and an FP8 per-tensor scale (minmax) needs only the whole weight's absmax,
one pass over the stored weight with no temporary; so each block of rows is quantized on its own by the
scheme's own ``quantize``. On a CPU, blocks of about 2**18 weights keep the float32 temporaries (the weight, the
codes, the error) in cache and, with ``slim.hostmem``'s allocator policy, on the same heap pages, where a whole
DeepSeek-R1 expert (2048 x 7168) makes every float32 temporary 58 MB of fresh pages. The quality figures (SQNR,
and the output error on the first calibration rows) are float32 norms of each block, summed in float64.

On a CPU, int4 weights with the minmax observer go through the fused kernel of ``slim.kernels`` (one pass per
weight, the same codes and scales; its SQNR sums are fp32 per group, float64 across groups) when it is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from slim import kernels
from slim.quant import int4
from slim.quant.fp8 import fake_quantize_input
from slim.quant.schemes import Scheme, dequantize_weight
from slim.quant.stats import absmax
from slim.quant.types import QuantizedLinear

CPU_BLOCK = 1 << 18  # weights per block on a CPU; devices quantize whole tensors (one kernel per step)


@dataclass
class Quality:
    """Sums of squares of the weight, its quantization error, and (with a sample) the module's output and
    its error with weights and activations as exported."""

    signal: float = 0.0
    noise: float = 0.0
    out_ref: float = 0.0
    out_err: float = 0.0
    has_sample: bool = False

    def add(self, w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor | None, xq: torch.Tensor | None) -> None:
        """w, wq: fp32 [rows, in] (wq is consumed: the error is computed in place); x, xq: fp32 [n, in]."""
        if x is not None:
            self.add_output(w, wq, x, xq)
        self.signal += float(torch.linalg.vector_norm(w)) ** 2
        self.noise += float(torch.linalg.vector_norm(wq.sub_(w))) ** 2

    def add_output(self, w: torch.Tensor, wq: torch.Tensor, x: torch.Tensor, xq: torch.Tensor) -> None:
        """The output of rows ``w`` on the sample ``x`` and its error with ``wq`` on ``xq``."""
        ref, out = F.linear(x, w), F.linear(xq, wq)
        self.out_ref += float(torch.linalg.vector_norm(ref)) ** 2
        self.out_err += float(torch.linalg.vector_norm(out.sub_(ref))) ** 2
        self.has_sample = True

    @property
    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0 else 10 * math.log10(self.signal / self.noise)

    @property
    def output_rel_err(self) -> float | None:
        """||y_q - y|| / ||y|| on the sample, or None without one."""
        return math.sqrt(self.out_err) / max(math.sqrt(self.out_ref), 1e-30) if self.has_sample else None


@torch.no_grad()
def quantize_blockwise(
    scheme: Scheme,
    weight: torch.Tensor,  # [out, in], as the model holds it (bf16)
    input_amax: torch.Tensor | None,
    group_size: int | None,
    weight_observer: str = "minmax",
    group_scale_dtype: torch.dtype | None = None,
    sample: torch.Tensor | None = None,  # [n, in]: the first calibration rows the module saw
    block: int | None = CPU_BLOCK,  # weights per block; None: the whole tensor at once
) -> tuple[QuantizedLinear, Quality]:
    """``scheme.quantize(weight.float(), ...)`` and its :class:`Quality`, computed ``block`` weights at a time."""
    out_features, in_features = weight.shape
    if block is not None and scheme.weight_bits == 4 and weight_observer == "minmax" and out_features:
        fused = _int4_fused(scheme, weight, input_amax, group_size, group_scale_dtype, sample, block)
        if fused is not None:
            return fused
    if out_features == 0:
        return scheme.quantize(weight.float(), input_amax, group_size, weight_observer, group_scale_dtype), Quality()
    rows = out_features if block is None else max(1, block // max(in_features, 1))
    whole_tensor_observer = scheme.weight_bits == 8 and weight_observer != "minmax"  # its search sees every weight
    if rows >= out_features or whole_tensor_observer:
        rows = out_features
    weight_amax = absmax(weight) if scheme.weight_bits == 8 and rows < out_features else None
    quality = Quality()
    x = xq = codes = scale = None
    for r in range(0, out_features, rows):
        w = weight[r : r + rows].float()
        q = scheme.quantize(w, input_amax, group_size, weight_observer, group_scale_dtype, weight_amax=weight_amax)
        if sample is not None and sample.numel() and x is None:
            x = sample.float().to(w.device)
            xq = fake_quantize_input(x, q.input_scale)
        quality.add(w, dequantize_weight(q, torch.float32).to(w.device), x, xq)
        if rows == out_features:
            return q, quality
        if codes is None:  # the whole tensor's codes and scales, filled block by block
            codes = torch.empty((out_features, in_features), dtype=q.weight.dtype, device=q.weight.device)
            scale = q.weight_scale if q.weight_bits == 8 else torch.empty(
                (out_features, q.weight_scale.shape[1]), dtype=q.weight_scale.dtype, device=q.weight_scale.device)
        codes[r : r + rows] = q.weight
        if q.weight_bits != 8:
            scale[r : r + rows] = q.weight_scale
    return QuantizedLinear(codes, scale, q.input_scale, q.weight_bits, q.group_size), quality


def _int4_fused(scheme: Scheme, weight: torch.Tensor, input_amax: torch.Tensor | None, group_size: int,
                group_scale_dtype: torch.dtype | None, sample: torch.Tensor | None, block: int
                ) -> tuple[QuantizedLinear, Quality] | None:
    """The int4 minmax path through ``slim.kernels.int4_quantize``; None where the kernel does not apply. The
    output error on ``sample`` is computed as in :func:`quantize_blockwise`, from the kernel's codes."""
    out = kernels.int4_quantize(weight, group_size, group_scale_dtype)
    if out is None:
        return None
    codes, scale, signal, noise = out
    q = QuantizedLinear(codes, scale, scheme.input_scale(input_amax), 4, group_size)
    quality = Quality(signal=signal, noise=noise)
    if sample is not None and sample.numel():
        x = sample.float()
        xq = fake_quantize_input(x, q.input_scale)
        rows = max(1, block // max(weight.shape[1], 1))
        for r in range(0, weight.shape[0], rows):
            wq = int4.dequantize_int4(codes[r : r + rows], scale[r : r + rows], group_size)
            quality.add_output(weight[r : r + rows].float(), wq, x, xq)
    return q, quality
