"""mode=sensitivity: which module groups a scheme can quantize, and the smallest ``ignore_layers`` that is safe.

1. Load the whole model (unquantized, e.g. bf16 from DeepSeek's FP8 release) and walk the calibration set
   through it layer by layer with input observers (slim's calibration code, so the activation scales are the
   ones ``mode=quantize`` computes); each layer's input hidden states are kept.
2. Candidate groups: per decoder layer, attention, dense MLP, shared experts and routed experts (all of a
   layer's experts as one group), plus ``lm_head``; each comes with the ``ignore_layers`` pattern selecting it.
3. Each group is quantized alone (the scheme's weights and static input scales, simulated with
   SimQuantLinear: the values export writes) and the calibration set is run from that group's layer on;
   the increase of the mean token NLL over the unquantized model ranks the groups.
4. Greedy search: quantize every candidate, then leave the most sensitive groups unquantized one at a time
   until the held-out metric is within ``sensitivity.target_delta`` (relative) of the unquantized model; then
   quantize again each kept group (least sensitive first) that the target still allows.

``sensitivity.method=layer_local`` is the streamed fallback for models too large to hold in memory: one layer
resident at a time, groups scored by the error they add to their own layer's output, no held-out search.

Writes ``sensitivity.json``, ``sensitivity.md`` and ``results.json`` in the run directory.
"""

from slim.sensitivity.groups import KINDS, Group, build_groups, classify, hydra_override, ignore_patterns
from slim.sensitivity.search import greedy_search
from slim.sensitivity.simulate import SimulatedModel, batches, text_tokens
from slim.sensitivity.stage import sensitivity_stage

__all__ = ["KINDS", "Group", "SimulatedModel", "batches", "build_groups", "classify", "greedy_search", "hydra_override",
           "ignore_patterns", "sensitivity_stage", "text_tokens"]
