"""Routed experts as one ``nn.Linear`` per projection, the way DeepSeek-V3 and Qwen3-MoE store them on disk.

transformers keeps these families' routed experts fused in memory (``gate_up_proj`` [E, 2I, H], ``down_proj``
[E, H, I]; ``DeepseekV3Experts``, ``Qwen3MoeExperts``) and splits them per expert when saving. slim swaps the
fused module for :class:`UnfusedExperts`, whose parameters are named exactly like the checkpoint
(``experts.{e}.gate_proj.weight`` ...), so every expert projection is an ordinary Linear that the dense code
path observes, quantizes and exports: no separate MoE path. Routers (``mlp.gate``) are left as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

try:  # skips torch.nn.init on the meta device (where it only costs time); an older transformers: slower, same model
    from transformers.initialization import no_init_weights
except ImportError:  # pragma: no cover - depends on the installed transformers
    from contextlib import nullcontext as no_init_weights


class ExpertMLP(nn.Module):
    """One routed expert: ``down(act(gate(x)) * up(x))``."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class UnfusedExperts(nn.ModuleList):
    """Drop-in for transformers' fused experts: same ``forward(hidden, top_k_index, top_k_weights)``.

    ``route_all`` (set by calibration when ``calibration.route_all_experts`` is on) makes every expert see
    every token so its observers get data; only the routed tokens contribute to the output, so the layer's
    result is unchanged.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, act: str):
        super().__init__([ExpertMLP(hidden_size, intermediate_size, act) for _ in range(num_experts)])
        self.route_all = False

    def forward(
        self,
        hidden_states: torch.Tensor,  # [T, H]
        top_k_index: torch.Tensor,  # [T, K]
        top_k_weights: torch.Tensor,  # [T, K]
    ) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token_idx, k_pos = torch.where(top_k_index == e)
            if self.route_all:
                y = expert(hidden_states)[token_idx]
            elif token_idx.numel() == 0:
                continue
            else:
                y = expert(hidden_states[token_idx])
            y = y * top_k_weights[token_idx, k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def unfuse_experts(model: nn.Module, fused_type: type, act: str) -> int:
    """Replace every ``fused_type`` module in ``model`` (on the meta device) by UnfusedExperts; return the count."""
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, fused_type)]
    for name, mod in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        # meta tensors hold no values: initializing them only costs time (R1 has tens of thousands of expert Linears)
        with torch.device("meta"), no_init_weights():
            unfused = UnfusedExperts(mod.num_experts, mod.hidden_dim, mod.intermediate_dim, act)
        unfused.to(dtype=mod.down_proj.dtype)  # meta tensors: only the dtype changes
        setattr(parent, attr, unfused)
    return len(targets)
