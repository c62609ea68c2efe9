"""Evaluation settings checked before anything is loaded: a mistake here must not cost a quantization first.

``check_eval(cfg)`` (run by ``slim.preflight`` after ``slim.config.validate``) raises SlimError naming the fix when the backend is not
available (vLLM's own python), when the checkpoint that will be scored cannot be served by the chosen backend or
numerics, when a task name is unknown offline (or generates text on the streamed backend), and when the hf backend
would build a model larger than the memory of the rank that evaluates it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

from slim.errors import SlimError

log = logging.getLogger(__name__)
GiB = 2**30
HF_RUNTIME_BYTES = 2 * GiB  # Python, torch, transformers and lm-eval in the evaluating process


def _scored_layout(cfg) -> tuple[bool, str]:
    """(static int4 weights with static FP8 activations, a description) of what will be scored."""
    if cfg.mode == "quantize":
        from slim.quant.schemes import scheme_from_config

        spec = scheme_from_config(cfg.scheme)  # presets defined by their YAML alone (fp8_dynamic) included
        return spec.weight_bits == 4 and spec.static_activations, f"scheme={cfg.scheme.name}"
    path = Path(cfg.model.path) / "config.json"
    qcfg = json.loads(path.read_text()).get("quantization_config") if path.is_file() else None
    if not qcfg:
        return False, f"{cfg.model.path}"
    from slim.models.numerics import resolve_numerics

    static_w4 = qcfg.get("quant_method") == "w4afp8" or (
        qcfg.get("quant_method") == "compressed-tensors" and resolve_numerics("auto", qcfg) == "checkpoint")
    return static_w4, f"the checkpoint {cfg.model.path}"


def check_backend(cfg) -> None:
    if cfg.eval.backend != "vllm":
        return
    from slim.evaluate_vllm import vllm_distribution, vllm_python

    vllm_distribution(vllm_python(cfg.eval))  # SlimError: unset, not executable, or no vllm in it


def check_servable(cfg) -> None:
    static_w4, what = _scored_layout(cfg)
    e = cfg.eval
    if e.backend == "vllm" and static_w4:
        raise SlimError(f"{what} has int4 weights with static FP8 activations, which no vLLM scheme loads: use "
                        "eval.backend=streamed (or hf), or scheme=w4a8_dynamic to serve it with vLLM")
    if e.numerics == "vllm" and static_w4:
        raise SlimError(f"eval.numerics=vllm: vLLM does not serve {what} (static W4A8); use eval.numerics=sglang "
                        "(SGLang/TensorRT-LLM, one input scale per MoE layer) or eval.numerics=checkpoint")
    if e.backend == "vllm" and e.numerics not in ("auto", "vllm"):
        raise SlimError(f"eval.numerics={e.numerics} applies to the hf and streamed backends (vLLM computes with its "
                        "own numerics): set eval.numerics=auto, or choose eval.backend=streamed")


def _output_type(entry) -> str | None:
    cfg = entry.cfg or {}
    if "output_type" not in cfg and entry.yaml_path is not None:
        from lm_eval.tasks._yaml_loader import load_yaml

        cfg = load_yaml(entry.yaml_path, resolve_func=False)
    return cfg.get("output_type")


def check_tasks(cfg) -> None:
    import yaml

    from slim.eval_tasks import TASKS_DIR

    tasks = list(cfg.eval.tasks)
    specs = [yaml.safe_load(p.read_text()) for p in TASKS_DIR.glob("*.yaml")]
    shipped = {spec.get("task"): spec.get("output_type") for spec in specs}
    output_types = {t: shipped[t] for t in tasks if t in shipped}
    rest = [t for t in tasks if t not in shipped]
    if rest:
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.WARNING)
        index = TaskManager(include_path=str(TASKS_DIR)).task_index
        unknown = [t for t in rest if t not in index]
        if unknown:
            raise SlimError(f"eval.tasks: unknown task(s) {', '.join(unknown)}; shipped tasks: "
                            f"{', '.join(sorted(shipped))}, or any name of `lm-eval ls tasks`")
        output_types |= {t: _output_type(index[t]) for t in rest}
    if cfg.eval.backend == "streamed":
        generating = [t for t, kind in output_types.items() if kind == "generate_until"]
        if generating:
            raise SlimError(f"eval.tasks {', '.join(generating)} generate text, which eval.backend=streamed cannot "
                            "(it scores log-likelihoods layer by layer): use eval.backend=vllm for them")


def hf_eval_bytes(config, dtype, batch_size: int, seq_len: int) -> int:
    """What the hf backend holds: every parameter in the compute dtype, one batch's logits (model dtype + fp32
    log-softmax) and the runtime."""
    from slim.models.adapters import build_skeleton

    model, _ = build_skeleton(config, dtype)
    dtype_bytes = dtype.itemsize
    params = sum(p.numel() for p in model.parameters())
    logits = batch_size * seq_len * config.vocab_size * (dtype_bytes + 4)
    return params * dtype_bytes + logits + HF_RUNTIME_BYTES


def check_memory(cfg) -> None:
    if cfg.eval.backend != "hf":
        return
    path = Path(cfg.model.path)
    if not (path / "config.json").is_file():
        return  # nothing to size yet (converted on first use, or not downloaded: mode=plan sizes the preset)
    from slim.models.adapters import load_config
    from slim.models.loading import torch_dtype

    config = load_config(str(path), cfg.model.trust_remote_code)
    seq_len = min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048)
    need = hf_eval_bytes(config, torch_dtype(cfg.model.dtype, cfg.hardware.device), cfg.eval.batch_size, seq_len)
    hw = cfg.hardware
    on_device = hw.device != "cpu" and hw.device_memory_gb > 0
    have = (hw.device_memory_gb if on_device else hw.host_memory_gb / max(hw.procs_per_node, 1)) * GiB
    if need > 0.95 * have:
        where = "device" if on_device else "host share"
        raise SlimError(f"eval.backend=hf builds the whole model in one process ({need / GiB:.0f} GiB), more than the "
                        f"{have / GiB:.0f} GiB {where} of hardware={hw.name}: use eval.backend=streamed (one layer at "
                        "a time) or eval.backend=vllm")


CHECKS: list[Callable] = [check_servable, check_backend, check_tasks, check_memory]


def check_eval(cfg) -> None:
    """Every check, cheapest first, when this run evaluates anything."""
    if cfg.mode not in ("quantize", "eval") or not cfg.eval.tasks:
        return
    for check in CHECKS:
        check(cfg)
