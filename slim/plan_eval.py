"""The evaluation's share of the memory plan, and the serving layouts vLLM accepts for a checkpoint.

Evaluation per rank (``eval_plan``):
- hf: the whole model in the compute dtype, one batch's logits and the runtime, in device memory (GPU) or the host;
- streamed: the largest decoder layer in the compute dtype, one batch's logits, and the hidden states of this rank's
  share of the evaluation requests (1/N of them on N ranks, slim.eval_ranks), placed by
  ``slim.hidden_store.choose_store``: device, host or disk.
The requests' token count is not known before the tasks are read; the plan assumes ``ASSUMED_REQUESTS`` requests
per task (``eval.limit`` when it is a count) of ``ASSUMED_TOKENS`` tokens each, and says so.

Serving (``vllm_layouts``): vLLM's W4A8-FP8 MoE (CUTLASS, compressed-tensors w4a8_dynamic) needs the hidden size
and the experts' intermediate size *per tensor-parallel partition* to be multiples of 256 (vllm/model_executor/
layers/quantization/compressed_tensors/compressed_tensors_moe/compressed_tensors_moe_w4a8_fp8.py checks both);
with expert parallelism an expert is not split, so its whole width counts.
"""

from __future__ import annotations

import torch
from torch import nn

from slim.hidden_store import choose_store

GiB = 2**30
ASSUMED_REQUESTS = 1000  # per task, when eval.limit is not a count
ASSUMED_TOKENS = 512  # per request (multiple-choice and perplexity windows of the shipped and standard tasks)
W4A8_FP8_ALIGN = 256
RUNTIME_BYTES = 2 * GiB


def eval_plan(cfg, model: nn.Module, adapter) -> tuple[dict[str, int], str, list[str], list[str]]:
    """(bytes by component, where hidden states wait, problems, notes) of evaluating on one rank."""
    e, hw, conf = cfg.eval, cfg.hardware, model.config
    if not e.tasks:
        return {}, "", [], []
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    max_len = min(getattr(conf, "max_position_embeddings", 2048) or 2048, 2048)
    logits = e.batch_size * max_len * conf.vocab_size * (dtype_bytes + 4)
    params = sum(p.numel() for p in model.parameters())
    device_cap = hw.device_memory_gb * GiB if hw.device != "cpu" else 0
    host_cap = hw.host_memory_gb * GiB / max(hw.procs_per_node, 1)
    problems, notes = [], []
    if e.backend == "vllm":
        return {}, "", [], ["eval.backend=vllm: the server's memory is vLLM's (see the serving layouts below)"]
    if e.backend == "hf":
        need = {"whole model (compute dtype)": params * dtype_bytes, "logits (one batch)": logits,
                "runtime": RUNTIME_BYTES}
        cap = device_cap or host_cap
        if sum(need.values()) > 0.95 * cap:
            problems.append(f"eval.backend=hf holds the whole model ({sum(need.values()) / GiB:.0f} GiB) in "
                            f"{cap / GiB:.0f} GiB: use eval.backend=streamed")
        return need, "", problems, notes
    requests = int(e.limit) if e.limit and e.limit >= 1 else ASSUMED_REQUESTS
    ranks = max(hw.nodes * hw.procs_per_node, 1)
    tokens = -(-len(e.tasks) * requests * min(ASSUMED_TOKENS, max_len) // ranks)  # this rank's share
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in adapter.layers(model))
    need, where = streamed_eval_bytes(conf, layer, dtype_bytes, e.batch_size * max_len, tokens, e.hidden_states,
                                      hw.device, int(device_cap), int(host_cap))
    hidden, layer, logits = need[f"request hidden states ({where})"], need["largest decoder layer (compute dtype)"], \
        need["logits (one batch)"]
    notes.append(f"eval: {len(e.tasks)} task(s) x {requests} requests x {min(ASSUMED_TOKENS, max_len)} tokens "
                 f"assumed" + (f", split over {ranks} ranks" if ranks > 1 else "") + f"; hidden states on the {where}")
    logits += need["forward activations (one batch)"]
    on_device = layer + logits + (hidden if where == "device" else 0)
    if device_cap and on_device > 0.95 * device_cap:
        problems.append(f"the streamed evaluation needs {on_device / GiB:.1f} GiB per device: lower eval.batch_size")
    on_host = RUNTIME_BYTES + (hidden if where == "host" else 0) + (0 if device_cap else layer + logits)
    if on_host > 0.95 * host_cap:
        problems.append(f"the streamed evaluation needs {on_host / GiB:.1f} GiB host memory per rank: set "
                        "eval.hidden_states=disk")
    return need, where, problems, notes


def streamed_eval_bytes(conf, layer_params: int, dtype_bytes: int, batch_tokens: int, tokens: int,
                        hidden_states: str = "auto", device: str = "cpu", device_cap: int = 0,
                        host_cap: int = 0) -> tuple[dict[str, int], str]:
    """(bytes by component, where hidden states wait) of the streamed backend scoring ``tokens`` request tokens
    in batches of at most ``batch_tokens`` (batch size x padded length), on a model whose largest layer has
    ``layer_params``."""
    hidden = tokens * conf.hidden_size * dtype_bytes
    where = choose_store(hidden_states, hidden, torch.device(device), device_cap, host_cap)
    inter = max(getattr(conf, "intermediate_size", 0),
                getattr(conf, "moe_intermediate_size", 0) * (getattr(conf, "num_experts_per_tok", 1) or 1))
    return {"largest decoder layer (compute dtype)": layer_params * dtype_bytes,
            "logits (one batch)": batch_tokens * conf.vocab_size * (dtype_bytes + 4),
            "forward activations (one batch)": batch_tokens * (4 * inter * dtype_bytes + 4 * conf.hidden_size * 4),
            f"request hidden states ({where})": hidden, "runtime": RUNTIME_BYTES}, where


def vllm_layouts(conf, scheme: str, gpus: int) -> list[str]:
    """``vllm serve`` parallel settings that load ``scheme``'s checkpoint of this model on ``gpus`` GPUs."""
    if gpus < 1:
        return []
    inter = getattr(conf, "moe_intermediate_size", None) or conf.intermediate_size
    if scheme == "w4a8":  # int4 with static FP8 activations: no vLLM scheme loads it
        return []
    if scheme != "w4a8_dynamic":
        return [f"--tensor-parallel-size {gpus}"]
    if conf.hidden_size % W4A8_FP8_ALIGN:
        return []  # no layout: the hidden size is not a multiple of 256
    tps = [t for t in (1, 2, 4, 8, 16, 32) if t <= gpus and gpus % t == 0 and (inter // t) % W4A8_FP8_ALIGN == 0
           and inter % t == 0]
    out = [f"--tensor-parallel-size {gpus} --enable-expert-parallel (experts whole: intermediate {inter})"]
    if tps:
        t = max(tps)
        out.insert(0, f"--tensor-parallel-size {t}" + (f" --pipeline-parallel-size {gpus // t}" if gpus > t else "")
                   + f" (per-partition intermediate {inter // t})")
    return out


def vllm_refused_tp(conf, scheme: str, gpus: int) -> list[int]:
    """Tensor-parallel sizes up to ``gpus`` that vLLM refuses for this checkpoint (W4A8-FP8 alignment)."""
    if scheme != "w4a8_dynamic":
        return []
    inter = getattr(conf, "moe_intermediate_size", None) or conf.intermediate_size
    return [t for t in (2, 4, 8, 16, 32) if t <= gpus and (inter % t or (inter // t) % W4A8_FP8_ALIGN)]
