"""What GPTQ's Hessians cost per rank, for ``slim.plan``: one in x in fp32 matrix per input group of a layer's
targets, and the routed experts' collected ``expert_chunk`` at a time (each further chunk reruns the layer's
calibration forward pass, see :mod:`slim.algorithms.gptq`).

The plan groups Linears by name as the runtime finds them by input: gate/up of one MLP or expert share an H, and
so do the attention projections that read the layer's normed hidden states (q/k/v, MLA's q_a/kv_a). It does not
count ``calibration.route_all_experts``' sharing of gate/up across experts: an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slim.algorithms.gptq import EXPERT_ID, SOLVE_BATCH_BYTES

SHARED_INPUT = {"gate_proj": "gate_up", "up_proj": "gate_up", "q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv",
                "q_a_proj": "qkv", "kv_a_proj_with_mqa": "qkv"}


@dataclass
class HessianPlan:
    resident_bytes: int  # the layer's non-expert Hessians + one chunk of experts'
    solve_bytes: int  # the solver's temporaries (a batch of problems' weights, H^-1 and copies)
    expert_chunk: int  # routed experts per calibration pass (0: the layer has none)
    passes: int  # calibration forward passes per layer
    problem: str = ""
    result_bytes: int = 0  # the layer's codes (a byte per weight) and fp32 group scales, held until written


def groups(targets: dict[str, nn.Linear]) -> dict[str, int]:
    """{input group: in_features} of one layer's targets."""
    out: dict[str, int] = {}
    for name, mod in targets.items():
        parent, _, leaf = name.rpartition(".")
        out[f"{parent}.{SHARED_INPUT.get(leaf, leaf)}"] = mod.in_features
    return out


def plan_hessians(targets: dict[str, nn.Linear], free_bytes: float, expert_chunk: int = 0, itemsize: int = 4
                  ) -> HessianPlan:
    """Hessian bytes of the layer whose ``targets`` are given, with the largest expert chunk whose Hessians fit in
    ``free_bytes`` beside the rest (or ``expert_chunk`` when set)."""
    by_group = groups(targets)
    result = sum(m.in_features * m.out_features for m in targets.values())
    result += result // 128 * 4  # group scales, at most fp32 per 128 weights (FP8: one per Linear)
    experts: dict[int, int] = {}
    dense = 0
    for key, cols in by_group.items():
        m = EXPERT_ID.search(key + ".")
        if m:
            experts[int(m.group(1))] = experts.get(int(m.group(1)), 0) + cols * cols * itemsize
        else:
            dense += cols * cols * itemsize
    largest = max((m.in_features * m.in_features + 2 * m.out_features * m.in_features) * 4 * 3
                  for m in targets.values()) if targets else 0
    solve = max(SOLVE_BATCH_BYTES, largest)
    if not experts:
        return HessianPlan(dense, solve, 0, 1, result_bytes=result)
    per_expert = max(experts.values())
    n = len(experts)
    chunk = expert_chunk or min(n, int((free_bytes - dense - solve) // per_expert))
    problem = ""
    if chunk < 1:
        problem = (f"GPTQ needs {(dense + per_expert + solve) / 2**30:.1f} GiB for one routed expert's Hessians "
                   "beside the layer: lower calibration.batch_size, use a device with more memory, or algorithm=rtn")
        chunk = 1
    chunk = min(chunk, n)
    return HessianPlan(dense + chunk * per_expert, solve, chunk, -(-n // chunk), problem, result)
