"""Candidate groups: the Linears quantized or kept together, and the ``ignore_layers`` patterns selecting them.

Per decoder layer: attention (``self_attn``), dense MLP, shared experts, routed experts (all of a layer's experts
as one group); plus ``lm_head``. Every pattern is checked against slim's own resolution (``slim.targets``).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from slim.quant.schemes import Scheme
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
    from slim.plan import quantized_bytes

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
            quantized_bytes=0 if bad else sum(quantized_bytes(m, scheme, group_size) for m in mods),
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


def group_row(g: Group, rank: int | None = None) -> dict[str, Any]:
    """A group as one JSON row (not measured: null, never NaN)."""
    num = lambda x: None if math.isnan(x) else x  # noqa: E731
    row = {"rank": rank} if rank is not None else {}
    return row | {"group": g.key, "kind": g.kind, "layer": g.layer, "pattern": g.pattern, "modules": len(g.modules),
                  "params": g.params, "kept_bytes": g.kept_bytes, "quantized_bytes": g.quantized_bytes,
                  "loss": num(g.loss), "delta": num(g.delta), "delta_se": num(g.delta_se),
                  **({"note": g.note} if g.note else {})}
