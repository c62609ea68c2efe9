"""``mode=plan``: size the run and its evaluation from ``config.json`` alone (the preset's shipped one when the
weights are not downloaded yet), print the tables, write ``results.json``, and refuse (exit 2) what does not fit
or what the checkpoint format cannot express."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slim import __version__
from slim.config import ASSETS, SlimConfig
from slim.errors import SlimError
from slim.formats import FORMATS
from slim.models.adapters import build_skeleton, load_config
from slim.models.loading import torch_dtype
from slim.plan import plan_memory
from slim.plan_eval import eval_plan, vllm_layouts, vllm_refused_tp
from slim.targets import select_targets
from slim.tracking import write_results


def check_format(cfg: SlimConfig, fmt, model, selection) -> None:
    """A format that cannot express this model or setting refuses it here, before anything is read or written."""
    check = getattr(fmt, "check_model", None)
    if check is None:
        return
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        check(model.config, linears, selection.targets, cfg.scheme.group_size, cfg.model.copy_mtp)
    except ValueError as exc:
        raise SlimError(str(exc)) from None


def plan_stage(cfg: SlimConfig) -> dict[str, Any]:
    """mode=plan: size the run from config.json alone; exit non-zero (SlimError) when it does not fit."""
    path = plan_config_path(cfg)
    dtype = torch_dtype(cfg.model.dtype, cfg.hardware.device)
    model, adapter = build_skeleton(load_config(str(path), cfg.model.trust_remote_code), dtype)
    selection = select_targets(model, cfg.scheme.ignore_layers)
    check_format(cfg, FORMATS[cfg.scheme.format], model, selection)
    plan = plan_memory(cfg, model, adapter, selection.ignored)
    print(plan.table())
    ev, hidden_on, ev_problems, notes = eval_plan(cfg, model, adapter)
    plan.problems.extend(ev_problems)
    gpus = cfg.hardware.nodes * cfg.hardware.procs_per_node if cfg.hardware.device != "cpu" else 0
    layouts = vllm_layouts(model.config, cfg.scheme.name, gpus)
    refused = vllm_refused_tp(model.config, cfg.scheme.name, gpus)
    if ev:
        print(f"evaluation (eval.backend={cfg.eval.backend}), per rank: " + ", ".join(
            f"{k} {v / 2**30:.2f} GiB" for k, v in ev.items()))
    for line in notes + [f"vLLM serves it with: {lay}" for lay in layouts] + (
            [f"vLLM refuses tensor-parallel {', '.join(map(str, refused))} for {cfg.scheme.name}"] if refused else []) + (
            [f"no vLLM layout serves {cfg.scheme.name} (static W4A8): SGLang / TensorRT-LLM do"] if gpus and not layouts else []):
        print(line)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {"slim_version": __version__, "mode": "plan", "model": cfg.model.name, "scheme": cfg.scheme.name,
               "plan": plan.to_dict() | {"config": str(path)},
               "eval_plan": {"backend": cfg.eval.backend, "bytes": ev, "hidden_states_on": hidden_on,
                             "feasible": not ev_problems, "problems": ev_problems, "notes": notes},
               "vllm_layouts": layouts, "vllm_refused_tensor_parallel": refused}
    write_results(run_dir, results)
    if not plan.feasible:
        raise SlimError("the run does not fit: " + "; ".join(plan.problems))
    return results


def plan_config_path(cfg: SlimConfig) -> Path:
    """model.path, or the preset's shipped config.json when the weights are not there yet (said in the log)."""
    path = Path(cfg.model.path)
    if (path / "config.json").is_file():
        return path
    shipped = ASSETS / "configs" / (cfg.model.shipped_config or "") / "config.json"
    if cfg.model.shipped_config and shipped.is_file():
        print(f"model.path={path} has no config.json: planning with the shipped {shipped}")
        return shipped.parent
    raise SlimError(f"model.path={path} has no config.json; mode=plan needs only that file")
