"""Simulated quantization: a Linear that computes with exactly the values a quantized checkpoint holds.

Used to evaluate exported checkpoints on any device (CPU included) and to propagate quantized outputs
during calibration. Weights stay compact (fp8 / int8 codes + scales) and are dequantized per forward;
activations are quantize-dequantized to FP8 with the static scale (or per token, for dynamic schemes);
the product is computed in fp32, as FP8 kernels accumulate, then cast back to the input dtype.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from slim.quant.fp8 import fake_quantize_input
from slim.quant.schemes import dequantize_weight
from slim.quant.types import QuantizedLinear


class SimQuantLinear(nn.Module):
    def __init__(self, q: QuantizedLinear, bias: torch.Tensor | None = None):
        super().__init__()
        self.q = q
        self.out_features, self.in_features = q.shape
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., in]
        xq = fake_quantize_input(x.float(), self.q.input_scale)
        w = dequantize_weight(self.q, torch.float32).to(x.device)  # [out, in]
        bias = None if self.bias is None else self.bias.float()
        return F.linear(xq, w, bias).to(x.dtype)

    def extra_repr(self) -> str:
        kind = "fp8" if self.q.weight_bits == 8 else f"int4 g{self.q.group_size}"
        act = "static" if self.q.input_scale is not None else "dynamic"
        return f"in={self.in_features}, out={self.out_features}, weight={kind}, act=fp8 {act}"


def swap_in(root: nn.Module, name: str, module: nn.Module) -> nn.Module:
    """Replace the submodule ``name`` of ``root``; return the old one."""
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, attr)
    setattr(parent, attr, module)
    return old
