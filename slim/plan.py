"""Memory plan: what a run needs per rank, from the model's config.json alone (no weights are read).

The model skeleton is built on the meta device (free), so every figure comes from the real module shapes:
the largest decoder layer streamed onto the device, the calibration hidden states kept between layers (on the
device, or in host memory when they do not fit there), one batch's forward activations, quantization
temporaries; on the host, the checkpoint pages of the layer being read (memory-mapped, as stored), the
quantized tensors in flight (the writer streams every tensor straight into its shard file), the tensors queued
for the writer thread where one runs (:func:`write_queue_bytes`) and the direct-I/O staging buffers. A run whose
plan does not fit its hardware preset is refused before anything is loaded.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from slim.config import SlimConfig
from slim.directio import STAGE_BUFFERS, stage_bytes_for
from slim.export import MAX_QUEUED_BYTES
from slim.formats import FORMATS
from slim.models.checkpoint import DECODE_CHUNK_BYTES
from slim.quant.schemes import scheme_from_config
from slim.quantize import STREAM_AHEAD, STREAM_AHEAD_BYTES, kernel_path, streamed_int4

GiB = 2**30
# Measured-order-of-magnitude fixed costs: CUDA context + allocator slack per GPU rank; Python + torch +
# transformers + lm-eval imports per process on the host.
DEVICE_RUNTIME_BYTES = int(1.5 * GiB)
HOST_RUNTIME_BYTES = int(2.0 * GiB)
USABLE_FRACTION = 0.95  # leave headroom for fragmentation
MiB = 2**20


def write_queue_bytes(layer_bytes: int) -> int:
    """How far the writer thread may lag behind the quantizer (where one runs: not on the streamed CPU path,
    whose main thread writes while the kernels' threads quantize), in bytes of queued tensors: an eighth of the
    largest layer (in the model dtype), at least the writer's default (16 MiB), at most 256 MiB. Enough to hold
    a layer's quantized experts while its unquantized tensors go to disk, so quantizing and writing overlap
    (with only the minimum queued, the quantizer waits for the disk on large layers)."""
    return min(256 * MiB, max(MAX_QUEUED_BYTES, layer_bytes // 8))


@dataclass
class MemoryPlan:
    model: str
    hardware: str
    world_size: int
    parameters: int
    largest_layer: str
    largest_layer_params: int
    device_bytes: dict[str, int] = field(default_factory=dict)  # per rank, by component
    host_bytes: dict[str, int] = field(default_factory=dict)  # per rank, by component
    device_capacity: int = 0
    host_capacity_per_rank: int = 0
    checkpoint_bytes: int = 0
    hidden_states_on: str = "device"  # device | host: where calibration hidden states wait between layers
    write_queue_bytes: int = MAX_QUEUED_BYTES  # the CheckpointWriter's bound on queued writes (write_queue_bytes())
    expert_chunk: int = 0  # algorithm=gptq: routed experts whose Hessians one calibration pass collects (0: all)
    calibration_passes: int = 1  # forward passes per decoder layer (GPTQ's expert chunks)
    problems: list[str] = field(default_factory=list)

    @property
    def device_total(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def host_total(self) -> int:
        return sum(self.host_bytes.values())

    @property
    def feasible(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return asdict(self) | {"device_total": self.device_total, "host_total": self.host_total, "feasible": self.feasible}

    def table(self) -> str:
        rows = [f"memory plan: {self.model} on {self.hardware} ({self.world_size} rank(s)), "
                f"{self.parameters / 1e9:.2f}B parameters, largest layer {self.largest_layer} "
                f"({self.largest_layer_params / 1e9:.3f}B)",
                "| per rank | component | GiB |", "|---|---|---:|"]
        rows += [f"| device | {k} | {v / GiB:.2f} |" for k, v in self.device_bytes.items()]
        rows += [f"| device | **total** (capacity {self.device_capacity / GiB:.0f}) | {self.device_total / GiB:.2f} |"]
        rows += [f"| host | {k} | {v / GiB:.2f} |" for k, v in self.host_bytes.items()]
        rows += [f"| host | **total** (share of node {self.host_capacity_per_rank / GiB:.0f}) | {self.host_total / GiB:.2f} |"]
        rows.append(f"calibration hidden states kept on the {self.hidden_states_on} between layers")
        if self.calibration_passes > 1 or self.expert_chunk:
            rows.append(f"GPTQ: routed experts' Hessians collected {self.expert_chunk} experts per pass, "
                        f"{self.calibration_passes} calibration pass(es) per layer")
        rows.append(f"expected checkpoint size: {self.checkpoint_bytes / GiB:.2f} GiB")
        rows.append("feasible" if self.feasible else "NOT feasible: " + "; ".join(self.problems))
        return "\n".join(rows)


def quantized_bytes(mod: nn.Linear, scheme, group_size: int | None) -> int:
    n = mod.in_features * mod.out_features
    if not scheme.per_group:
        return n + 8  # fp8 weight + fp32 weight_scale and input_scale
    groups = n // group_size
    return n // 2 + groups * 2 + 16  # packed int4 + bf16 group scales + shape + input_scale


def checkpoint_bytes(cfg: SlimConfig, model, targets: dict[str, nn.Linear], dtype_bytes: int) -> int:
    """Bytes of the exported checkpoint's tensors: quantized targets in the format's layout, the rest in the model
    dtype, or as the format stores them (w4afp8: int4 experts with fp32 group scales, other Linears block FP8)."""
    fmt = FORMATS[cfg.scheme.format]
    own_rest, own_quantized = getattr(fmt, "rest_nbytes", None), getattr(fmt, "quantized_nbytes", None)
    scheme = scheme_from_config(cfg.scheme)
    quantized = sum(own_quantized(m.out_features, m.in_features) if own_quantized is not None
                    else quantized_bytes(m, scheme, cfg.scheme.group_size) for m in targets.values())
    rest = ((n, p) for n, p in model.named_parameters()
            if not (n.endswith(".weight") and n[: -len(".weight")] in targets))
    if own_rest is None:
        return quantized + sum(p.numel() for _, p in rest) * dtype_bytes
    return quantized + sum(own_rest(n, tuple(p.shape), dtype_bytes) for n, p in rest)


def _gptq(cfg: SlimConfig, scheme, adapter, layers, targets: dict[str, nn.Linear], where: dict[str, int], hw):
    """algorithm=gptq: the worst layer's Hessians and solver temporaries, added to ``where`` (the device's
    components, or the host's on a CPU), with the expert chunk that fits what is left there."""
    from slim.algorithms.gptq_memory import plan_hessians

    if "gptq" not in cfg.algorithm.name or cfg.calibration.source == "none" or not (
            scheme.per_group or cfg.algorithm.fp8_weights):
        return None
    capacity = hw.device_memory_gb if hw.device != "cpu" else hw.host_memory_gb / hw.procs_per_node
    itemsize = 8 if cfg.algorithm.hessian_dtype == "float64" else 4
    world = hw.nodes * hw.procs_per_node
    # ranks add their sums in rank order from an all-gather, one Hessian at a time: world copies of the largest
    gather = world * max((m.in_features ** 2 for m in targets.values()), default=0) * itemsize if world > 1 else 0
    free = USABLE_FRACTION * capacity * GiB - sum(where.values()) - gather
    prefixes = {adapter.layer_prefix(i) for i in range(len(layers))}
    from slim.layer_loop import group_by_prefix

    plans = [plan_hessians(t, free, cfg.algorithm.expert_chunk, itemsize)
             for t in group_by_prefix(targets, prefixes).values()]
    if not plans:
        return None
    worst = max(plans, key=lambda p: p.resident_bytes + p.solve_bytes)
    worst.result_bytes = max(p.result_bytes for p in plans)
    where["GPTQ Hessians (one layer; routed experts one chunk)"] = worst.resident_bytes
    where["GPTQ solve temporaries"] = worst.solve_bytes
    if gather:
        where["GPTQ Hessian all-gather (ranks x the largest H)"] = gather
    return worst


def plan_memory(cfg: SlimConfig, model, adapter, ignored: set[str]) -> MemoryPlan:
    """Per-rank device and host bytes for ``cfg`` on ``model`` (a meta skeleton)."""
    hw, cal, conf = cfg.hardware, cfg.calibration, model.config
    world = hw.nodes * hw.procs_per_node
    dtype_bytes = torch.finfo(model.dtype).bits // 8
    scheme = scheme_from_config(cfg.scheme)
    layers = adapter.layers(model)
    layer_params = [sum(p.numel() for p in layer.parameters()) for layer in layers]
    big = max(range(len(layers)), key=layer_params.__getitem__)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = {n: m for n, m in linears.items() if n not in ignored}

    samples = math.ceil(cal.num_samples / world)
    batch = min(cal.batch_size, samples)
    hidden, T = conf.hidden_size, cal.seq_len
    heads = getattr(conf, "num_attention_heads", 1)
    inter = max(getattr(conf, "intermediate_size", 0),
                getattr(conf, "moe_intermediate_size", 0) * (getattr(conf, "num_experts_per_tok", 1) or 1))
    largest_linear = max((m.in_features * m.out_features for m in targets.values()), default=0)

    # calibration off on a CPU with the kernels, from block FP8 (as the pipeline decides): nothing runs a layer, so
    # its block-FP8 weights (every Linear's, as DeepSeek stores them) are never materialized: they go from the mapped
    # codes to int4 on the kernels' threads, queued ahead of the one being written (see in_flight), or to the writer
    # a block of rows at a time; the main thread writes (no writer queue). Without the kernels, or from bf16, the
    # layer is materialized.
    streamed = kernel_path(cal.source != "none", hw.device, hw.cpu_kernels) and cfg.model.load_type == "fp8"
    fused, packed = streamed_int4(scheme, FORMATS[cfg.scheme.format], cfg.scheme.group_size,
                                  cfg.scheme.weight_observer)

    def in_flight_bytes(m: nn.Linear) -> int:
        """What one Linear in flight holds: its output, and on the streamed path what it is computed beside."""
        out, n = quantized_bytes(m, scheme, cfg.scheme.group_size), m.in_features * m.out_features
        if not streamed or (fused and packed):
            return out
        if fused:  # the kernel's int8 codes, a byte per weight, beside the words packed after it
            return out + n
        return out + n + n * dtype_bytes  # materialized in the model dtype when its turn comes, and its codes

    layer_weights, temporaries = layer_params[big], 3 * largest_linear * 4
    if streamed:
        layer_weights -= sum(m.weight.numel() for m in layers[big].modules() if isinstance(m, nn.Linear))
        temporaries = DECODE_CHUNK_BYTES
    all_hidden = 2 * samples * T * hidden * dtype_bytes  # every sample's input and output of one layer
    device = {
        "layer weights (compute dtype)": layer_weights * dtype_bytes,
        "calibration hidden states (in + out)": all_hidden,
        "forward activations (one batch)": batch * T * (heads * T * 4 + 4 * inter * dtype_bytes + 4 * hidden * 4),
        "quantization temporaries (fp32)": temporaries,
    }
    stored_bytes = 1 if cfg.model.load_type == "fp8" else dtype_bytes  # per weight on disk (FP8 codes or bf16)
    queue = 0 if streamed else write_queue_bytes(layer_params[big] * dtype_bytes)
    in_flight = max(map(in_flight_bytes, targets.values()), default=0)
    if streamed and fused:  # the one being written; queued ones (at least STREAM_AHEAD, more up to
        # STREAM_AHEAD_BYTES: KernelQueue); spare outputs kept for reuse (TensorPool, at most STREAM_AHEAD_BYTES)
        in_flight += max(STREAM_AHEAD * in_flight, STREAM_AHEAD_BYTES) + STREAM_AHEAD_BYTES
    host = {
        "checkpoint pages of one layer (memory-mapped)": layer_params[big] * stored_bytes,
        "writer (quantized tensors in flight)": in_flight,  # unfused ones are quantized in turn
        "writer queue (tensors waiting for the disk)": queue,
        "writer staging buffers (direct I/O)": STAGE_BUFFERS * stage_bytes_for(queue),
        "runtime": HOST_RUNTIME_BYTES,
    }
    hidden_on = "device"
    if hw.device == "cpu":
        hidden_on = "host"
        host.update(device)
        device = {}
    else:  # FP8 codes are decoded on the device: nothing dequantized is staged on the host
        device["runtime (CUDA context)"] = DEVICE_RUNTIME_BYTES
        too_big = sum(device.values()) > USABLE_FRACTION * hw.device_memory_gb * GiB
        if cfg.scheme.low_memory and hw.device_memory_gb and too_big and all_hidden:
            # low-memory mode, too big for the device: they wait in host memory and each batch visits the device
            del device["calibration hidden states (in + out)"]
            device["calibration hidden states (one batch in + out)"] = 2 * batch * T * hidden * dtype_bytes
            host["calibration hidden states (in + out)"] = all_hidden
            hidden_on = "host"

    gptq = _gptq(cfg, scheme, adapter, layers, targets, device or host, hw)
    if gptq is not None:  # the codes and scales GPTQ hands the writer wait in host memory for the layer's writes
        host["GPTQ results (codes and scales of one layer)"] = gptq.result_bytes

    plan = MemoryPlan(
        model=cfg.model.name, hardware=hw.name, world_size=world, parameters=sum(p.numel() for p in model.parameters()),
        largest_layer=adapter.layer_prefix(big).rstrip("."), largest_layer_params=layer_params[big],
        device_bytes=device, host_bytes=host, device_capacity=int(hw.device_memory_gb * GiB),
        host_capacity_per_rank=int(hw.host_memory_gb * GiB / hw.procs_per_node),
        checkpoint_bytes=checkpoint_bytes(cfg, model, targets, dtype_bytes),
        hidden_states_on=hidden_on, write_queue_bytes=queue,
    )
    if gptq is not None:
        plan.expert_chunk, plan.calibration_passes = gptq.expert_chunk, gptq.passes
        if gptq.problem:
            plan.problems.append(gptq.problem)
    if device and plan.device_total > USABLE_FRACTION * plan.device_capacity:
        plan.problems.append(
            f"needs {plan.device_total / GiB:.1f} GiB per device, {hw.name} has {hw.device_memory_gb:g} GiB: lower "
            "calibration.num_samples/seq_len/batch_size or use more ranks")
    if plan.host_total > USABLE_FRACTION * plan.host_capacity_per_rank:
        plan.problems.append(
            f"needs {plan.host_total / GiB:.1f} GiB host memory per rank, {hw.name} gives "
            f"{plan.host_capacity_per_rank / GiB:.1f} GiB: lower the calibration size or use a bigger host")
    return plan
