"""Which modules get quantized: target Linears minus ``ignore_layers``, with every pattern accounted for.

Pattern forms (the same a user would write in the seed's ``ignore_layers``):
- ``re:<regex>``   matched with ``re.match`` against the full module name (compressed-tensors' convention);
- glob (``*``, ``?``, ``[``) matched with fnmatch against the name or any dotted suffix of it;
- plain text       an exact name, or a run of whole dotted components inside the name, so ``lm_head``,
                   ``self_attn``, ``shared_experts`` or ``mlp.down_proj`` select what a user expects.
A pattern that matches no target module is an error: a typo must never silently quantize everything.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from slim.errors import SlimError


def matches(pattern: str, name: str) -> bool:
    if pattern.startswith("re:"):
        return re.match(pattern[3:], name) is not None
    if any(ch in pattern for ch in "*?["):
        parts = name.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))
    return f".{pattern}." in f".{name}."


def resolve_ignored(patterns: Iterable[str], names: Iterable[str]) -> tuple[set[str], dict[str, list[str]]]:
    """Return (ignored module names, pattern -> names it matched). Raises on a pattern matching nothing."""
    names = list(names)
    matched = {p: [n for n in names if matches(p, n)] for p in patterns}
    unused = [p for p, hit in matched.items() if not hit]
    if unused:
        sample = ", ".join(names[:3] + (["..."] if len(names) > 3 else []))
        raise SlimError(
            f"scheme.ignore_layers pattern(s) {unused} match no quantizable module (module names look like: "
            f"{sample}); fix the pattern, use 're:<regex>' or a glob, or remove it"
        )
    return {n for hit in matched.values() for n in hit}, matched


@dataclass
class Selection:
    """The Linears of a model that get quantized, and what ``ignore_layers`` took out (and why)."""

    targets: dict[str, nn.Linear]
    ignored: set[str]
    matches: dict[str, list[str]]


def select_targets(model: nn.Module, patterns: Iterable[str]) -> Selection:
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    ignored, matched = resolve_ignored(patterns, linears)
    return Selection({n: m for n, m in linears.items() if n not in ignored}, ignored, matched)


ROUTED_EXPERT_RE = re.compile(r"\.experts\.\d+\.")  # one routed expert's part of a name
KINDS = ("attention", "dense mlp", "shared expert", "routed experts", "lm_head", "other")


def module_kind(name: str) -> str:
    """What a quantized Linear is, from its name: attention, dense mlp, shared expert, routed experts, lm_head."""
    if ".self_attn." in f".{name}.":
        return "attention"
    if ROUTED_EXPERT_RE.search(name):
        return "routed experts"
    if ".shared_experts." in name:
        return "shared expert"
    if name == "lm_head" or name.endswith(".lm_head"):
        return "lm_head"
    if ".mlp." in name:
        return "dense mlp"
    return "other"
