"""AWQ mappings per model family: which module's output AWQ smooths and which modules consume that output.

A mapping pairs a *smooth* module (a norm, or a Linear whose output rows can be divided) with its *balance*
modules (every consumer of that output: their input channels are multiplied by the same scales, so the layer
computes the same function). The lists follow llm-compressor's AWQ mappings (vllm-project/llm-compressor,
``src/llmcompressor/modifiers/transform/awq/mappings.py``, formerly ``modifiers/awq/mappings.py``):
``_deepseek_mappings`` for DeepSeek-V3/R1 (MLA: q_a_proj or q_proj, kv_a_proj_with_mqa; the q/kv latent norms;
the router ``mlp.gate`` with every routed and shared expert), ``_moe_default_mappings`` for Qwen3-MoE and
``default_mappings`` for dense Llama-style decoders (v_proj -> o_proj only where the shapes agree, i.e. without
grouped-query attention, as the reference's ``_check_layers_are_compatible``).

Names are regular expressions (full match) relative to the decoder layer; ``{scope}`` in a balance pattern is the
``scope`` group of the smooth module's match, so each expert's up_proj pairs with that expert's down_proj.
The error objective of a mapping is the output of its *parent*, the lowest common ancestor of its balance modules
that is not a ModuleList (the reference's ``get_lowest_common_ancestor_with_avoid``): the attention block, the
whole MoE block (router, routed and shared experts), or the single down_proj / q_b_proj / kv_b_proj.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

_EXPERT_SCOPE = r"(?P<scope>mlp\.(experts\.\d+\.|shared_experts\.)?)"


@dataclass(frozen=True)
class Mapping:
    smooth: str  # regex of the smooth module (full match, relative to the layer)
    balance: tuple[str, ...]  # regexes of its consumers; the first pattern's first match hooks the statistics


_ATTN_NORM_MLA = Mapping("input_layernorm", (r"self_attn\.(q_a_proj|q_proj)", r"self_attn\.kv_a_proj_with_mqa"))
_ATTN_NORM_QKV = Mapping("input_layernorm", (r"self_attn\.q_proj", r"self_attn\.k_proj", r"self_attn\.v_proj"))
_V_TO_O = Mapping(r"self_attn\.v_proj", (r"self_attn\.o_proj",))
# the router first: it sees every token, so the activation statistics are hooked there (experts see their own)
_MLP_NORM = Mapping("post_attention_layernorm",
                    (r"mlp\.gate", r"mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up)_proj"))
_UP_TO_DOWN = Mapping(_EXPERT_SCOPE + "up_proj", (r"{scope}down_proj",))

MAPPINGS: dict[str, tuple[Mapping, ...]] = {
    "deepseek_v3": (
        _ATTN_NORM_MLA,
        Mapping(r"self_attn\.q_a_layernorm", (r"self_attn\.q_b_proj",)),
        Mapping(r"self_attn\.kv_a_layernorm", (r"self_attn\.kv_b_proj",)),
        _MLP_NORM,
        _UP_TO_DOWN,
    ),
    "qwen3_moe": (_ATTN_NORM_QKV, _V_TO_O, _MLP_NORM, _UP_TO_DOWN),
    "decoder": (_ATTN_NORM_QKV, _V_TO_O, _MLP_NORM, _UP_TO_DOWN),  # Llama, Mistral, Qwen2/3
}
"""Adapter name (slim.models.adapters) -> its mappings, in the order they are applied."""


@dataclass
class Resolved:
    """One mapping in one layer: names relative to the layer."""

    smooth_name: str
    smooth: nn.Module
    balance: dict[str, nn.Module]  # in pattern order: the first one's input is where statistics are taken
    parent_name: str
    parent: nn.Module


def _out_features(module: nn.Module) -> int | None:
    weight = getattr(module, "weight", None)
    if weight is None:
        return None
    return weight.shape[0]


def _lowest_common_ancestor(names: list[str], modules: dict[str, nn.Module]) -> str:
    """The deepest module name every one of ``names`` lies in (or is), skipping ModuleLists (UnfusedExperts is
    one: it has no forward of its own that takes the block's input)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    while common and isinstance(modules[".".join(common)], nn.ModuleList):
        common.pop()
    return ".".join(common)


def resolve(layer: nn.Module, mappings: tuple[Mapping, ...]) -> list[list[Resolved]]:
    """Per mapping, its instances in ``layer`` whose shapes agree (a smooth module's output width = each balance
    module's input width). A pattern that matches nothing in this layer (``mlp.gate`` in a dense layer) is
    simply absent."""
    modules = dict(layer.named_modules())
    out = []
    for mapping in mappings:
        found = []
        for name, smooth in modules.items():
            m = re.fullmatch(mapping.smooth, name)
            if m is None or getattr(smooth, "weight", None) is None:
                continue
            scope = re.escape(m.groupdict().get("scope") or "")
            balance: dict[str, nn.Module] = {}
            for pattern in mapping.balance:
                regex = pattern.replace("{scope}", scope)
                balance |= {n: mod for n, mod in modules.items()
                            if re.fullmatch(regex, n) and getattr(mod, "weight", None) is not None
                            and mod.weight.dim() == 2}
            width = _out_features(smooth)
            if not balance or any(b.weight.shape[1] != width for b in balance.values()):
                continue
            parent_name = _lowest_common_ancestor(list(balance), modules)
            found.append(Resolved(name, smooth, balance, parent_name, modules[parent_name]))
        out.append(found)
    return out
