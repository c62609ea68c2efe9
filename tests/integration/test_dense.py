"""A dense Llama-style decoder (random tiny config from transformers) quantizes and round-trips too."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slim.models.loading import load_model
from slim.models.simulated import SimQuantLinear
from slim.pipeline import quantize_stage
from tests.helpers.configs import compose_config


def save_llama(out, embedded_model_path, tie=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=tie)
    model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_path / f, out / f)
    return out, model.eval()


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, embedded_model_path):
    return save_llama(tmp_path_factory.mktemp("llama") / "llama", embedded_model_path)


@pytest.mark.parametrize("scheme", ["fp8_static", "w4a8", "w4a8_dynamic"])
def test_dense_model_quantizes_and_loads_back(tiny_llama, tmp_path, scheme):
    src, ref = tiny_llama
    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", f"scheme={scheme}", "scheme.ignore_layers=[lm_head]",
                         "eval=none", "logger=none", "calibration.num_samples=4", "calibration.seq_len=64")
    res = quantize_stage(cfg, src, tmp_path / "ckpt", AutoTokenizer.from_pretrained(str(src)))
    assert len(res["modules"]) == 2 * 7  # q, k, v, o, gate, up, down per layer
    model = load_model(str(tmp_path / "ckpt"))
    assert sum(isinstance(m, SimQuantLinear) for m in model.modules()) == 14
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():
        a, b = ref(ids).logits.float(), model(ids).logits.float()
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    assert cos > (0.99 if scheme == "fp8_static" else 0.95), cos


def test_transformers_loads_our_fp8_checkpoint(tiny_llama, tmp_path):
    src, _ = tiny_llama
    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", "eval=none", "logger=none",
                         "calibration.num_samples=4", "calibration.seq_len=64")
    quantize_stage(cfg, src, tmp_path / "ckpt", AutoTokenizer.from_pretrained(str(src)))
    theirs = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.bfloat16).eval()
    ours = load_model(str(tmp_path / "ckpt"))
    sims = {n: m for n, m in ours.named_modules() if isinstance(m, SimQuantLinear)}
    assert len(sims) == 14
    for name, sim in sims.items():  # transformers holds exactly the FP8 values and scales we read
        mod = theirs.get_submodule(name)
        assert mod.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(mod.weight.view(torch.uint8), sim.q.weight.view(torch.uint8)), name
        # transformers keeps scales in the model dtype (bf16 here): ours, rounded to it
        for theirs_scale, ours_scale in ((mod.weight_scale, sim.q.weight_scale), (mod.input_scale, sim.q.input_scale)):
            assert torch.equal(theirs_scale.reshape(1), ours_scale.to(theirs_scale.dtype).reshape(1)), name
    ids = torch.arange(1, 65).unsqueeze(0)
    with torch.no_grad():  # theirs runs bf16 activations, ours simulates FP8 activations too
        a, b = theirs(ids).logits.float(), ours(ids).logits.float()
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.99


def test_tied_embeddings_are_read_from_the_embedding(tmp_path, embedded_model_path):
    src, ref = save_llama(tmp_path / "tied", embedded_model_path, tie=True)
    from safetensors import safe_open

    with safe_open(src / "model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # saved once, as transformers does
    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", "eval=none", "logger=none",
                         "calibration.num_samples=4", "calibration.seq_len=64")
    quantize_stage(cfg, src, tmp_path / "ckpt", AutoTokenizer.from_pretrained(str(src)))
    model = load_model(str(tmp_path / "ckpt"))
    assert torch.equal(model.lm_head.weight, ref.model.embed_tokens.weight)
    names = set()
    for shard in (tmp_path / "ckpt").glob("*.safetensors"):
        with safe_open(shard, framework="pt") as f:
            names |= set(f.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names  # stays tied: stored once
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["tie_word_embeddings"] is True


def test_a_quantized_lm_head_is_untied(tmp_path, embedded_model_path):
    src, ref = save_llama(tmp_path / "tied", embedded_model_path, tie=True)
    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", "scheme.ignore_layers=[]", "eval=none",
                         "logger=none", "calibration.num_samples=4", "calibration.seq_len=64")
    quantize_stage(cfg, src, tmp_path / "ckpt", AutoTokenizer.from_pretrained(str(src)))
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    model = load_model(str(tmp_path / "ckpt"))
    assert isinstance(model.lm_head, SimQuantLinear)
    assert model.lm_head.q.weight.dtype == torch.float8_e4m3fn
