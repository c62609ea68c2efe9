"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore, and validation.

The YAML files under ``conf/`` fill these schemas; a wrong type or an unknown key fails at compose time.
``validate`` adds the cross-field checks that Hydra cannot express, with messages that name the fix.
Seed (reference project) keys keep their meaning: ``model.name/load_type/low_cpu_mem_usage/device_map`` and
``quantization.name/bits/low_memory/quant_method/group_size/ignore_layers`` live at ``scheme.*`` here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from slim.errors import SlimError

ASSETS = Path(__file__).resolve().parent / "assets"

LOAD_TYPES = ("fp8", "bf16")
MODES = ("quantize", "plan", "eval", "sensitivity")
MOE_INPUT_SCALES = ("auto", "expert", "layer_max")  # export.moe_input_scale
# slim.formats.FORMATS' keys, without importing the formats
FORMAT_NAMES = ("compressed-tensors", "fp8_native", "w4afp8")
DTYPES = ("auto", "bfloat16", "float16", "float32")
CALIBRATION_SOURCES = ("embedded", "jsonl", "hf", "none")
EVAL_BACKENDS = ("hf", "streamed", "vllm")  # slim.evaluate.BACKENDS' keys
NUMERICS = ("auto", "checkpoint", "vllm", "sglang")  # slim.models.numerics.NUMERICS_CHOICES


@dataclass
class ModelConfig:
    name: str = MISSING  # seed: model.name (e.g. DeepSeek)
    path: str = MISSING  # directory with config.json, safetensors and tokenizer
    load_type: str = "fp8"  # seed: fp8 = DeepSeek 128x128 block-FP8 weights, bf16 = plain floating-point weights
    low_cpu_mem_usage: bool = True  # seed: keep weights on the host, stream one layer at a time
    device_map: str = "cpu"  # seed: where weights wait between layers
    # compute dtype of calibration and evaluation (and the skeleton's); auto: bfloat16 on GPUs and CPUs with native
    # bf16 matmuls, float32 on other CPUs (slim.models.loading.resolve_dtype)
    dtype: str = "auto"
    trust_remote_code: bool = False
    convert_from: str | None = None  # fp8 checkpoint converted into `path` (bf16) when `path` is missing
    copy_mtp: bool = False  # copy DeepSeek's multi-token-prediction layer through unquantized
    # the evaluation backend this model's presets pick (eval=embedded/standard read it: backend: ${model.eval_backend});
    # streamed for models no single host holds (deepseek_r1*), hf otherwise
    eval_backend: str = "hf"
    # slim/assets/configs/<name>/config.json: what mode=plan sizes when model.path has no config.json yet
    shipped_config: str | None = None


@dataclass
class QuantArgsConfig:
    """One side of a scheme (weights or input activations): the fields of compressed-tensors' ``QuantizationArgs``
    that slim reads. A weights block takes its group size from ``scheme.group_size``."""

    type: str = "float"  # float | int
    num_bits: int = 8
    strategy: str = "tensor"  # tensor | group (weights); tensor | token (activations)
    dynamic: bool = False  # activations: scales computed per token at run time instead of calibrated
    symmetric: bool = True


@dataclass
class SchemeConfig:
    name: str = MISSING  # seed: quantization.name
    bits: int = 8  # seed: quantization.bits (weight bits)
    quant_method: str = "per-tensor"  # seed: weight granularity, per-tensor | per-group
    group_size: int | None = None  # seed: quantization.group_size (per-group only)
    ignore_layers: list[str] = field(default_factory=lambda: ["lm_head"])  # seed: layers left unquantized
    # seed: quantization.low_memory. Layers always stream one at a time; true also lets calibration hidden
    # states wait in host memory when they do not fit on the device (false: such a run is refused)
    low_memory: bool = True
    weight_observer: str = "minmax"
    activation_observer: str = "minmax"
    format: str = "compressed-tensors"
    # what the scheme does, as data (slim.quant.schemes.scheme_from_config); null: the built-in preset of `name`
    weights: QuantArgsConfig | None = None
    input_activations: QuantArgsConfig | None = None  # null with weights set: weight-only


@dataclass
class AlgorithmConfig:
    """The per-layer step around observing a layer and quantizing it (slim.algorithms.ALGORITHMS); the fields after
    ``name`` are GPTQ's and AWQ's (conf/algorithm/*.yaml; docs/algorithms.md)."""

    name: str = "rtn"
    # gptq (slim.algorithms.gptq)
    dampening_frac: float = 0.01  # added to H's diagonal: this fraction of its mean
    dampening_retries: int = 2  # an H not positive definite is retried with 10x the fraction, this many times
    block_size: int = 128  # columns per lazy block update (the group size where the two do not divide one another)
    min_tokens: int = 32  # a Hessian from fewer calibration tokens falls back to round to nearest
    expert_chunk: int = 0  # routed experts whose Hessians are collected per calibration pass; 0: the plan picks
    fp8_weights: bool = False  # GPTQ on FP8 per-tensor weights too (false: they stay round to nearest)
    # static: columns solved in decreasing H-diagonal order, group scales fixed up front, nothing stored | none
    actorder: str = "static"
    # what x^T x is summed in: float32 (as the references) | float64 (twice the memory; ranks and one process then
    # solve the same H, so their codes agree)
    hessian_dtype: str = "float32"
    # awq (slim.algorithms.awq): points of the smoothing-strength grid searched per mapping
    grid: int = 20
    # awq: weight means in the scales too (auto: for per-group weights, not per tensor) | true | false | both
    duo_scaling: str = "auto"
    # awq: the error search runs on the first this-many calibration samples (null: all); activation means use all
    search_samples: int | None = 32
    # awq: round the scales to powers of two, so folding them in is exact in bf16 too (routing bit-identical)
    pow2_scales: bool = False


@dataclass
class HardwareConfig:
    name: str = MISSING
    nodes: int = 1
    procs_per_node: int = 1
    device: str = "cpu"  # cpu | cuda
    device_memory_gb: float = 0.0  # per device; 0 = host memory only
    host_memory_gb: float = 24.0
    backend: str = "gloo"  # gloo (cpu) | nccl (cuda)
    low_memory: bool = True
    threads: int = 0  # torch intra-op threads; 0 = leave torch's default
    timeout_s: int = 1800  # a collective that waits longer fails the job (a rank died or hangs)
    rank0_wait_s: int = 86400  # ranks wait this long for rank 0's work outside collectives (model.convert_from)
    # fused C kernels for the weight path on a CPU (slim.kernels): null = when a C compiler builds them
    cpu_kernels: bool | None = None


@dataclass
class CalibrationConfig:
    name: str = MISSING
    source: str = "embedded"  # embedded | jsonl | hf | none (calibration off: weights only, w4a8_dynamic)
    path: str | None = None  # jsonl file (source=jsonl)
    dataset: str | None = None  # dataset name (source=hf), needs dataset access
    split: str = "train"
    text_field: str = "text"
    num_samples: int = 32
    seq_len: int = 256
    batch_size: int = 8
    seed: int = 0
    route_all_experts: bool = False  # every token visits every routed expert while observing
    propagate: str = "unquantized"  # unquantized | quantized: what layer i+1 sees during calibration


@dataclass
class EvalConfig:
    name: str = MISSING
    tasks: list[str] = field(default_factory=list)
    # hf: the whole model in this process (simulated quantization, CPU or GPU), models that fit one host;
    # streamed: every request walks the model one decoder layer at a time (slim.evaluate_streamed), any size;
    # vllm: see below
    backend: str = "hf"
    # the scales the scores compute with: auto (the engine that serves the checkpoint's layout) | checkpoint (as
    # written) | vllm | sglang (slim.models.numerics)
    numerics: str = "auto"
    hidden_states: str = "auto"  # streamed: where requests' hidden states wait, auto | device | host | disk
    spill_dir: str | None = None  # streamed, hidden_states on disk: a local directory (default: <run dir>/eval_spill)
    batch_size: int = 8
    limit: float | None = None
    num_fewshot: int | None = None
    baseline: bool = True  # also evaluate the unquantized model
    cache_baseline: bool = True  # reuse the unquantized model's scores across runs ($SLIM_CACHE_DIR/baselines)
    # backend=vllm: slim starts vLLM's OpenAI server on the checkpoint directory from a separate environment and
    # scores it through lm-eval's local-completions model; slim's own process never imports vllm.
    vllm_python: str | None = None  # that environment's python (default: $SLIM_VLLM_PYTHON)
    vllm_tensor_parallel_size: int = 1
    vllm_args: list[str] = field(default_factory=list)  # more `vllm serve` arguments, e.g. [--enforce-eager]
    vllm_port: int = 0  # on 127.0.0.1; 0 = a free port
    vllm_startup_timeout_s: int = 1800  # loading, compiling and warming up; the server is stopped after


@dataclass
class LoggerConfig:
    name: str = MISSING
    project: str = "slim"
    entity: str | None = None
    mode: str = "offline"  # offline | online | disabled
    group: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class ExportConfig:
    max_shard_mb: int = 4096  # a shard closes at the first layer boundary past this size
    resume: bool = True  # rerunning in the same run dir continues an interrupted export
    commit_every: int = 1  # decoder layers between commit points (each saves the calibration hidden states)
    # shards around the page cache (O_DIRECT): null = on local disk filesystems (ext4, xfs, ...), else buffered
    direct_io: bool | None = None
    checksum: str = "xxh3_128"  # digest of every tensor in slim_manifest.json: xxh3_128 (fast) | sha256
    # routed experts' static input scales: expert (each its own) | layer_max (each MoE layer's max over its experts,
    # what the engines apply; modules.json keeps each expert's observed amax) | auto (layer_max for format w4afp8,
    # expert for the others)
    moe_input_scale: str = "auto"


@dataclass
class SensitivityConfig:
    """mode=sensitivity: rank module groups by their effect on the calibration loss, then find the smallest
    ``ignore_layers`` that keeps the held-out metric within ``target_delta`` of the unquantized model."""

    target_delta: float = 0.01  # allowed relative increase of the held-out metric (heldout=text: token perplexity)
    kinds: list[str] = field(  # candidate groups: per decoder layer (all of a layer's routed experts are one group)
        default_factory=lambda: ["attention", "dense_mlp", "shared_experts", "routed_experts", "lm_head"])
    method: str = "whole_model"  # whole_model (in memory) | layer_local (streamed; ranking only, for huge models)
    rank_by: str = "loss"  # loss: calibration-loss increase | loss_per_byte: increase per byte the group saves
    max_groups: int | None = None  # most groups the search may keep unquantized (layer_local: the top ones kept)
    prune: bool = True  # after reaching the target, quantize again each kept group the target still allows
    heldout: str = "text"  # text: mean token NLL on heldout_path | lm_eval: heldout_task's metric | calibration
    heldout_path: str | None = None  # JSON lines with a text field; null = the shipped held-out text
    heldout_text_field: str = "text"
    heldout_seq_len: int = 256
    heldout_max_tokens: int | None = None  # cap on held-out tokens (null: all of them)
    heldout_task: str = "slim_text_ppl"  # heldout=lm_eval: an lm-eval task and a lower-is-better metric of it
    heldout_metric: str = "word_perplexity"
    compare_scheme_ignore: bool = True  # also score scheme.ignore_layers as given, as a reference row


@dataclass
class SlimConfig:
    model: ModelConfig = MISSING
    scheme: SchemeConfig = MISSING
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    hardware: HardwareConfig = MISSING
    calibration: CalibrationConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    mode: str = "quantize"
    seed: int = 0
    run_dir: str = "."  # filled from hydra.runtime.output_dir by the entry point
    overwrite: bool = False


def register_configs() -> None:
    """Register the schemas; YAML files in conf/<group>/ start with ``defaults: [base_<group>]``."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=SlimConfig)
    for group, node in (
        ("model", ModelConfig),
        ("scheme", SchemeConfig),
        ("algorithm", AlgorithmConfig),
        ("hardware", HardwareConfig),
        ("calibration", CalibrationConfig),
        ("eval", EvalConfig),
        ("logger", LoggerConfig),
    ):
        cs.store(group=group, name=f"base_{group}", node=node)
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", lambda name: str(ASSETS / name))
    if not OmegaConf.has_resolver("strategy"):  # scheme.quant_method (seed key) -> QuantizationArgs strategy
        OmegaConf.register_new_resolver("strategy", lambda method: str(method).removeprefix("per-"))


def _choice(value: Any, valid: tuple[str, ...], key: str) -> None:
    if value not in valid:
        raise SlimError(f"{key}={value!r} is not valid; choose one of: {', '.join(valid)}")


def _scheme(s: SchemeConfig):
    """The scheme the config describes; its errors name the keys to fix."""
    from slim.quant.schemes import scheme_from_config

    try:
        scheme = scheme_from_config(s)
    except (ValueError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
        reason = str(exc).splitlines()[0].removeprefix(f"scheme {s.name}: ")
        raise SlimError(f"scheme={s.name}: {reason} (set scheme.weights / "
                        "scheme.input_activations, or scheme.bits / scheme.quant_method)") from None
    if s.weights is not None and s.bits != scheme.weight_bits:
        raise SlimError(f"scheme.bits={s.bits} but scheme.weights.num_bits={scheme.weight_bits}: set them alike")
    if (s.quant_method == "per-group") != scheme.per_group:
        raise SlimError(f"scheme={s.name} quantizes weights {'per group' if scheme.per_group else 'per tensor'}: "
                        f"set scheme.quant_method={'per-group' if scheme.per_group else 'per-tensor'}")
    return scheme


def _algorithm(cfg: SlimConfig) -> None:
    a = cfg.algorithm
    if a.name.startswith("awq"):
        _choice(str(a.duo_scaling).lower(), ("auto", "true", "false", "both"), "algorithm.duo_scaling")
        if a.grid < 4:
            raise SlimError(f"algorithm.grid={a.grid} is too small for awq's search; use at least 4 (default 20)")
        if a.search_samples is not None and a.search_samples <= 0:
            raise SlimError("algorithm.search_samples must be positive (or null: every calibration sample)")
        if cfg.calibration.source == "none":
            raise SlimError(f"algorithm={a.name} searches its scales on calibration activations: choose "
                            "calibration=embedded (or jsonl/hf), or algorithm=rtn")
    if "gptq" not in a.name:
        return
    if not 0 < a.dampening_frac < 1 or a.dampening_retries < 0:
        raise SlimError(f"algorithm.dampening_frac={a.dampening_frac} must lie in (0, 1) (0.01 is GPTQ's usual) and "
                        f"algorithm.dampening_retries={a.dampening_retries} must be >= 0")
    _choice(a.hessian_dtype, ("float32", "float64"), "algorithm.hessian_dtype")
    _choice(a.actorder, ("static", "none"), "algorithm.actorder")
    if a.block_size <= 0 or a.min_tokens < 0 or a.expert_chunk < 0:
        raise SlimError("algorithm.block_size must be positive, algorithm.min_tokens and algorithm.expert_chunk >= 0")
    if cfg.calibration.source == "none" and cfg.mode == "quantize":
        raise SlimError(f"algorithm={a.name} needs the layers' calibration inputs: choose calibration=embedded (or "
                        "jsonl/hf), or algorithm=rtn")


def validate(cfg: SlimConfig) -> SlimConfig:
    _choice(cfg.mode, MODES, "mode")
    _choice(cfg.model.load_type, LOAD_TYPES, "model.load_type")
    _choice(cfg.model.dtype, DTYPES, "model.dtype")
    _choice(cfg.scheme.quant_method, ("per-tensor", "per-group"), "scheme.quant_method")
    _choice(cfg.calibration.source, CALIBRATION_SOURCES, "calibration.source")
    _choice(cfg.calibration.propagate, ("unquantized", "quantized"), "calibration.propagate")
    _choice(cfg.logger.mode, ("offline", "online", "disabled"), "logger.mode")
    _choice(cfg.eval.backend, EVAL_BACKENDS, "eval.backend")
    _choice(cfg.eval.numerics, NUMERICS, "eval.numerics")
    _choice(cfg.eval.hidden_states, ("auto", "device", "host", "disk"), "eval.hidden_states")
    from slim.checksum import ALGORITHMS

    _choice(cfg.export.checksum, ALGORITHMS, "export.checksum")
    from slim.quant.observers import ACTIVATION_OBSERVERS, WEIGHT_OBSERVERS

    _choice(cfg.scheme.weight_observer, tuple(WEIGHT_OBSERVERS), "scheme.weight_observer")
    _choice(cfg.scheme.activation_observer, tuple(ACTIVATION_OBSERVERS), "scheme.activation_observer")
    from slim.algorithms import ALGORITHMS

    _choice(cfg.algorithm.name, tuple(ALGORITHMS), "algorithm")
    _algorithm(cfg)
    _choice(cfg.scheme.format, FORMAT_NAMES, "scheme.format")  # before mode=plan, which counts by format
    _choice(cfg.export.moe_input_scale, MOE_INPUT_SCALES, "export.moe_input_scale")
    s = cfg.scheme
    if s.quant_method == "per-group":
        if not s.group_size or s.group_size <= 0:
            raise SlimError(f"scheme.quant_method=per-group needs a positive scheme.group_size (got {s.group_size})")
    elif s.group_size is not None:
        raise SlimError("scheme.group_size is only used with scheme.quant_method=per-group; set it to null")
    scheme = _scheme(s)
    if s.format == "w4afp8" and not (scheme.per_group and scheme.weight_bits == 4 and scheme.static_activations
                                     and s.group_size == 128):
        raise SlimError(f"scheme.format=w4afp8 (SGLang/TensorRT-LLM static W4A8) stores int4 weights with group_size "
                        f"128 and static FP8 activations (scheme w4a8) only, got scheme={s.name} group_size="
                        f"{s.group_size}; "
                        "set scheme=w4a8 scheme.group_size=128, or scheme.format=compressed-tensors")
    if cfg.model.low_cpu_mem_usage and not s.low_memory:
        raise SlimError("model.low_cpu_mem_usage=true runs with weights on the host, which needs "
                        "scheme.low_memory=true (or set model.low_cpu_mem_usage=false)")
    if cfg.model.low_cpu_mem_usage and cfg.model.device_map != "cpu":
        raise SlimError(
            "model.low_cpu_mem_usage=true keeps weights on the host: set model.device_map=cpu "
            "(or model.low_cpu_mem_usage=false)"
        )
    if cfg.export.max_shard_mb <= 0 or cfg.export.commit_every <= 0:
        raise SlimError("export.max_shard_mb and export.commit_every must be positive")
    c = cfg.calibration
    if c.source == "none":
        from slim.quant.schemes import SCHEMES as PRESETS

        if scheme.static_activations:
            dynamic = [n for n, spec in PRESETS.items() if not spec.static_activations]
            raise SlimError(
                f"scheme={s.name} stores static activation scales, which come from calibration: choose "
                f"calibration=embedded (or jsonl/hf), or a dynamic-activation scheme: {', '.join(dynamic)}")
        if cfg.mode == "sensitivity":
            raise SlimError("mode=sensitivity ranks modules by calibration loss: choose calibration=embedded "
                            "(or jsonl/hf)")
        return cfg
    if c.num_samples <= 0 or c.seq_len <= 0 or c.batch_size <= 0:
        raise SlimError("calibration.num_samples, seq_len and batch_size must be positive")
    if c.source == "jsonl" and not c.path:
        raise SlimError("calibration.source=jsonl needs calibration.path=<file.jsonl>")
    if c.source == "hf" and not c.dataset:
        raise SlimError("calibration.source=hf needs calibration.dataset=<name>")
    return cfg
