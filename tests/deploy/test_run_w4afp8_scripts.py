"""experiments/deploy/run_sglang.sh and run_trtllm.sh: what they refuse (no engine needed: --dry-run).

The rules restated (experiments/deploy/w4afp8_check.py cites the engine files): SGLang W4AFp8Config min capability
90 and its cutlass_w4a8_moe scale layout [E, K // 512, N * 8]; TensorRT-LLM WInt4AFP8FusedMoEMethod runs on SM89/SM90
with K a multiple of 128; experts split over tp / ep ranks.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[2] / "experiments" / "deploy"
# DeepSeek-R1's shapes (config.json of the published model)
R1 = dict(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", hidden_size=7168,
          moe_intermediate_size=2048, n_routed_experts=256, num_attention_heads=128, num_hidden_layers=61)


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "checkpoint"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(R1 | {"quantization_config": {"quant_method": "w4afp8"}}))
    (d / "model-00001-of-00001.safetensors").write_bytes(b"")
    for name in ("hf_quant_config.json", "quant_cfg.json"):
        (d / name).write_text("{}")
    return d


def fake_gpus(tmp_path, capability, count=8):
    """An nvidia-smi on PATH that lists ``count`` GPUs of compute capability ``capability``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\ncase \"$*\" in *compute_cap*) for i in $(seq %d); do echo %s; done ;; "
                   "*) for i in $(seq %d); do echo \"GPU $i: H\"; done ;; esac\n" % (count, capability, count))
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run(script, *args, env=None, dry=True):
    full = {k: v for k, v in os.environ.items()
            if k not in ("CUDA_VISIBLE_DEVICES", "SLIM_SGLANG_PYTHON", "SLIM_API_KEY")}
    full.update(env or {})
    return subprocess.run(["bash", str(DEPLOY / script), *map(str, args), *(["--dry-run"] if dry else [])],
                          capture_output=True,
                          text=True, env=full, timeout=60)


def test_sglang_expert_parallel_on_hopper_builds_the_command(ckpt, tmp_path):
    proc = run("run_sglang.sh", ckpt, "--tp", 8, "--ep", 8, "--python", sys.executable, env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 0, proc.stderr
    assert "--quantization w4afp8 --tp-size 8 --ep-size 8" in proc.stdout


def test_sglang_two_nodes(ckpt, tmp_path):
    env = fake_gpus(tmp_path, "9.0")
    proc = run("run_sglang.sh", ckpt, "--tp", 16, "--nnodes", 2, "--node-rank", 1, "--dist-init-addr", "10.0.0.1:5000",
               "--python", sys.executable, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--tp-size 16 --ep-size 16 --nnodes 2 --node-rank 1 --dist-init-addr 10.0.0.1:5000" in proc.stdout
    proc = run("run_sglang.sh", ckpt, "--tp", 16, "--nnodes", 2, "--python", sys.executable, env=env)
    assert proc.returncode == 2 and "--dist-init-addr" in proc.stderr


@pytest.mark.parametrize("script,args,cap,message", [
    # R1's 2048-wide experts over 8 tensor-parallel ranks: 256 per rank, not a multiple of 512 for SGLang
    ("run_sglang.sh", ["--tp", 8, "--ep", 1], "9.0", "multiple of 512: use expert parallelism (--ep 8"),
    ("run_sglang.sh", ["--tp", 8, "--ep", 8], "8.0", "run on 9.0 only"),
    ("run_sglang.sh", ["--tp", 8, "--ep", 3], "9.0", "--ep 3 must divide --tp 8"),
    ("run_sglang.sh", ["--tp", 8, "--", "--speculative-algorithm", "NEXTN"], "9.0", "no multi-token-prediction"),
    # TensorRT-LLM: 2048 / 32 = 64 per rank, below its 128
    ("run_trtllm.sh", ["--tp", 32, "--ep", 1, "--launcher", "mpirun -np 32"], "9.0", "multiple of 128"),
    ("run_trtllm.sh", ["--tp", 8, "--ep", 8], "10.0", "8.9 / 9.0 only"),
])
def test_layouts_the_engines_cannot_run_are_refused(ckpt, tmp_path, script, args, cap, message):
    extra = ["--python", sys.executable] if script == "run_sglang.sh" else []
    sep = args.index("--") if "--" in args else len(args)
    proc = run(script, ckpt, *args[:sep], *extra, *args[sep:], env=fake_gpus(tmp_path, cap))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr


def test_trtllm_on_ada_and_hopper_and_its_config_files(ckpt, tmp_path):
    for cap in ("8.9", "9.0"):
        proc = run("run_trtllm.sh", ckpt, "--tp", 16, "--ep", 1, "--launcher", "mpirun -np 16 -H a:8,b:8",
                   env=fake_gpus(tmp_path, cap))
        assert proc.returncode == 0, proc.stderr  # 2048 / 16 = 128 per rank: TensorRT-LLM's minimum
        assert "mpirun -np 16 -H a:8" in proc.stdout and "trtllm-llmapi-launch trtllm-serve serve" in proc.stdout
        assert "--backend pytorch --tp_size 16 --ep_size 1" in proc.stdout
    (ckpt / "quant_cfg.json").unlink()
    proc = run("run_trtllm.sh", ckpt, "--tp", 8, env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 2 and "quant_cfg.json is missing" in proc.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5"])
def test_trtllm_refuses_a_public_host(ckpt, tmp_path, host):
    proc = run("run_trtllm.sh", ckpt, "--tp", 8, "--host", host, env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 2
    assert f"--host {host} would serve TensorRT-LLM's API" in proc.stderr and "proxy" in proc.stderr
    proc = run("run_trtllm.sh", ckpt, "--tp", 8, "--host", "127.0.0.1", env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 0 and "--host 127.0.0.1" in proc.stdout, proc.stderr


@pytest.mark.parametrize("script", ["run_sglang.sh", "run_trtllm.sh"])
def test_other_layouts_are_refused_naming_the_export(ckpt, tmp_path, script):
    config = json.loads((ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors"}
    (ckpt / "config.json").write_text(json.dumps(config))
    extra = ["--python", sys.executable] if script == "run_sglang.sh" else []
    proc = run(script, ckpt, "--tp", 8, *extra, env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 2 and "scheme.format=w4afp8" in proc.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.7"])
def test_sglang_refuses_a_public_host_without_a_key(ckpt, tmp_path, host):
    proc = run("run_sglang.sh", ckpt, "--tp", 8, "--host", host, "--python", sys.executable,
               env=fake_gpus(tmp_path, "9.0"))
    assert proc.returncode == 2
    assert f"--host {host} serves the SGLang API" in proc.stderr and "SLIM_API_KEY" in proc.stderr


@pytest.mark.parametrize("how", ["option", "SLIM_API_KEY"])
def test_sglang_public_host_with_a_key_passes_it_as_api_key(ckpt, tmp_path, how):
    """SGLang's ServerArgs.api_key is the flag --api-key (sgl-project/sglang python/sglang/srt/server_args.py: flags are
    derived from the field names); it has no environment variable, so the key is on the server's command line, and
    the script prints REDACTED in its place."""
    key = "s3cret-key-456"
    fake = tmp_path / "fake-python"
    fake.write_text('#!/bin/bash\necho "SERVER ARGS: $*"\n')
    fake.chmod(0o755)
    option = ["--api-key", key] if how == "option" else []
    env = fake_gpus(tmp_path, "9.0") | ({"SLIM_API_KEY": key} if how != "option" else {})
    proc = run("run_sglang.sh", ckpt, "--tp", 8, "--ep", 8, "--host", "0.0.0.0", *option, "--python", fake, env=env,
               dry=False)
    assert proc.returncode == 0, proc.stderr
    server_args = next(x for x in proc.stdout.splitlines() if x.startswith("SERVER ARGS:"))
    assert f"--host 0.0.0.0 --port 30000 --api-key {key}" in server_args
    printed = next(x for x in proc.stdout.splitlines() if "running:" in x)
    assert "--api-key REDACTED" in printed and key not in printed
