"""Qwen3-MoE (Qwen3MoeForCausalLM) end to end: a tiny random model saved by transformers, quantized through the
real CLI, checked against a whole-model transformers forward, and loaded back through slim's loader.

transformers keeps Qwen3-MoE's routed experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H],
``mlp.experts.down_proj`` [E, H, I]) and saves them per expert (``mlp.experts.{e}.gate_proj.weight`` ...);
the router ``mlp.gate`` is a plain weight, not a Linear. There is no shared expert.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F

from slim.calibration.data import calibration_tokens
from slim.models.loading import load_model
from slim.models.simulated import SimQuantLinear
from slim.quant.fp8 import fp8_scale, quantize_fp8
from tests.helpers.configs import compose_config

NUM_SAMPLES, SEQ_LEN, BATCH = 8, 64, 8
CALIB = [f"calibration.num_samples={NUM_SAMPLES}", f"calibration.seq_len={SEQ_LEN}", f"calibration.batch_size={BATCH}"]
PROJ = ("gate_proj", "up_proj", "down_proj")
# Qwen3-MoE checkpoints have no shared expert and (Qwen3-30B-A3B, Qwen3-235B-A22B) no dense layer, so the
# w4a8 default list (written for DeepSeek) has patterns that match nothing; routed experts only W4 is:
W4A8_IGNORE = "scheme.ignore_layers=[lm_head,self_attn]"
# The same for any layout (dense layers, shared experts, other families): everything but the routed experts.
ROUTED_ONLY = r"scheme.ignore_layers=['re:^(?!.*\.experts\.\d+\.)']"


# ---------------------------------------------------------------- helpers


def qwen3_moe_config(**overrides):
    from transformers import Qwen3MoeConfig

    kw = dict(vocab_size=4096, hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
              norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
              tie_word_embeddings=False)
    kw.update(overrides)
    return Qwen3MoeConfig(**kw)


def kill_expert(model, layer: int, expert: int) -> None:
    """Make the router of ``layer`` never pick ``expert``. Hidden channel 0 becomes a positive constant in every
    token that only that expert's router row reads (negated): the embedding sets it, no Linear writes to it
    (row 0 of o_proj/down_proj zero) or reads it (column 0 of q/k/v, gate/up and routers zero)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 0.1
        for lyr in model.model.layers:
            attn, mlp = lyr.self_attn, lyr.mlp
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
                proj.weight[:, 0] = 0
            attn.o_proj.weight[0] = 0
            if hasattr(mlp, "experts"):  # fused in memory: gate_up_proj [E, 2I, H], down_proj [E, H, I]
                mlp.experts.gate_up_proj[:, :, 0] = 0
                mlp.experts.down_proj[:, 0] = 0
                mlp.gate.weight[:, 0] = 0
            else:
                mlp.gate_proj.weight[:, 0] = mlp.up_proj.weight[:, 0] = 0
                mlp.down_proj.weight[0] = 0
        gate = model.model.layers[layer].mlp.gate.weight
        gate[expert] = 0
        gate[expert, 0] = -1.0


def save_qwen3_moe(out: Path, tokenizer_dir: Path, seed: int = 0, dead: tuple[int, int] | None = None, **overrides):
    """A random bf16 Qwen3-MoE saved by transformers' save_pretrained, with the embedded model's tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(qwen3_moe_config(**overrides), dtype=torch.bfloat16).eval()
    if dead is not None:
        kill_expert(model, *dead)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, out / f)
    return out


def slim_main(*args, cwd, returncode=0, timeout=600):
    """``python -m slim.main ARGS`` in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    proc = subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == returncode, proc.stderr[-3000:]
    return proc


def read_all(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in set(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values()):
        with safe_open(path / shard, framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def calibration_ids(src: Path) -> torch.Tensor:
    """The token ids the CLI calibrates with for these overrides."""
    from transformers import AutoTokenizer

    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", *CALIB)
    return calibration_tokens(cfg.calibration, AutoTokenizer.from_pretrained(str(src)), 512)


def transformers_model(src: Path):
    """The model as transformers runs it: fused experts, its own eager expert loop."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16, experts_implementation="eager").eval()


def transformers_inputs(src: Path, ids: torch.Tensor) -> tuple[dict[str, float], dict[str, int]]:
    """Reference without streaming: one whole-model transformers forward per batch. Returns max |input| of every
    Linear and of every routed expert projection (computed from the fused weights for the tokens transformers'
    router sent to that expert), and the routed token count per expert projection."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    model = transformers_model(src)
    amax: dict[str, float] = {}
    tokens: dict[str, int] = {}

    def note(name, x):
        if x.numel():
            amax[name] = max(amax.get(name, 0.0), x.abs().amax().float().item())

    def experts_hook(name):
        def fn(mod, args):
            hidden, top_k_index = args[0], args[1]  # [T, H], [T, K]
            for e in range(mod.num_experts):
                x = hidden[(top_k_index == e).any(dim=-1)]
                gate, up = F.linear(x, mod.gate_up_proj[e]).chunk(2, dim=-1)
                for proj, inp in (("gate_proj", x), ("up_proj", x), ("down_proj", mod.act_fn(gate) * up)):
                    note(f"{name}.{e}.{proj}", inp)
                    tokens[f"{name}.{e}.{proj}"] = tokens.get(f"{name}.{e}.{proj}", 0) + x.shape[0]
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            mod.register_forward_pre_hook(lambda _m, args, name=name: note(name, args[0]))
        elif isinstance(mod, Qwen3MoeExperts):
            mod.register_forward_pre_hook(experts_hook(name))
    with torch.no_grad():
        for chunk in ids.split(BATCH):
            model(chunk)
    return amax, tokens


def expert_names(config, layers) -> list[str]:
    return [f"model.layers.{i}.mlp.experts.{e}.{p}" for i in layers for e in range(config.num_experts) for p in PROJ]


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.float().flatten(), b.float().flatten(), dim=0).item()


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory, embedded_model_path):
    return save_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe") / "src", embedded_model_path)


@pytest.fixture(scope="module")
def cli_runs(qwen3_moe, tmp_path_factory):
    """fp8_static (default ignore list, the model preset) and w4a8 (routed experts only), each through
    ``python -m slim.main``."""
    root = tmp_path_factory.mktemp("qwen3_moe_runs")
    runs = {}
    for scheme, extra in (("fp8_static", ["model=qwen3_moe_example"]), ("w4a8", ["model.load_type=bf16", W4A8_IGNORE])):
        run_dir = root / scheme
        slim_main(f"model.path={qwen3_moe}", f"scheme={scheme}", *extra, "eval=none", "logger=none",
                  f"hydra.run.dir={run_dir}", *CALIB, cwd=root)
        runs[scheme] = run_dir
    return runs


@pytest.fixture(scope="module")
def reference(qwen3_moe):
    return transformers_inputs(qwen3_moe, calibration_ids(qwen3_moe))


# ---------------------------------------------------------------- tests


def test_transformers_saves_experts_per_expert(qwen3_moe):
    """The on-disk layout slim's unfused experts are named after (save_pretrained of transformers' fused experts)."""
    with safe_open(qwen3_moe / "model.safetensors", framework="pt") as f:
        names = set(f.keys())
    config = qwen3_moe_config()
    assert {n + ".weight" for n in expert_names(config, range(2))} <= names
    assert not any("gate_up_proj" in n for n in names)
    assert {"model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"} <= names
    assert not any("shared_expert" in n for n in names)


def test_skeleton_has_one_linear_per_expert_projection(qwen3_moe):
    from slim.models.adapters import build_skeleton, load_config

    model, adapter = build_skeleton(load_config(str(qwen3_moe)), torch.bfloat16)
    assert adapter.name == "qwen3_moe"
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert set(expert_names(model.config, range(2))) <= linears
    assert not any(n.endswith("mlp.gate") for n in linears)  # the router is not a Linear: never quantized
    assert not any(p.dim() > 2 for p in model.parameters())  # nothing left fused


def test_adapter_without_the_fused_experts_class_refuses_stacked_experts(qwen3_moe):
    from transformers import AutoModelForCausalLM

    from slim.errors import SlimError
    from slim.models.adapters import ModelAdapter, load_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(load_config(str(qwen3_moe)), dtype=torch.bfloat16)
    with pytest.raises(SlimError, match=r"keeps expert weights stacked \(model\.layers\.0\.mlp\.experts\.gate_up_proj"):
        ModelAdapter(name="plain").prepare(model)


def test_unsupported_architecture_names_the_supported_ones(tmp_path, embedded_model_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    src = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_embd=32, n_layer=1, n_head=2, n_positions=128)).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(embedded_model_path / f, src / f)
    proc = slim_main(f"model.path={src}", "model.load_type=bf16", "eval=none", "logger=none",
                     f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, returncode=2)
    supported = "deepseek_v3, llama, mistral, qwen2, qwen3, qwen3_moe"
    assert f"error: model_type 'gpt2' is not supported; supported: {supported}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fp8_static_every_expert_has_its_own_scales_from_its_routed_tokens(qwen3_moe, cli_runs, reference):
    """(b) + (c): every routed expert its own weight_scale and input_scale; the streaming calibration's input
    scales are bit-exact with a whole-model transformers forward, and each expert saw exactly its routed tokens."""
    run = cli_runs["fp8_static"]
    tensors = read_all(run / "checkpoint")
    modules = {m["name"]: m for m in json.loads((run / "modules.json").read_text())}
    ref_amax, ref_tokens = reference
    config = qwen3_moe_config()
    experts = expert_names(config, range(2))
    attn = [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkvo"]
    assert set(modules) == set(experts) | set(attn)
    with safe_open(qwen3_moe / "model.safetensors", framework="pt") as src:
        for name in modules:
            w = src.get_tensor(name + ".weight")
            scale = fp8_scale(w.float().abs().amax().reshape(1))
            assert torch.equal(tensors[name + ".weight_scale"], scale), name
            fp8 = tensors[name + ".weight"].view(torch.uint8)
            assert torch.equal(fp8, quantize_fp8(w, scale).view(torch.uint8)), name
            assert torch.equal(tensors[name + ".input_scale"], fp8_scale(torch.tensor([ref_amax[name]]))), name
        for n in ("model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight",
                  "model.embed_tokens.weight", "model.layers.1.self_attn.q_norm.weight"):
            assert torch.equal(tensors[n], src.get_tensor(n)), n  # unquantized tensors pass through bit-exactly
    # tokens per expert: what transformers' router sends there, every token top_k times per layer
    for name in experts:
        assert modules[name]["tokens"] == ref_tokens[name] > 0, name
    for i in range(2):
        per_layer = sum(modules[f"model.layers.{i}.mlp.experts.{e}.gate_proj"]["tokens"]
                        for e in range(config.num_experts))
        assert per_layer == NUM_SAMPLES * SEQ_LEN * config.num_experts_per_tok
    assert len({float(tensors[n + ".input_scale"]) for n in experts if n.endswith("down_proj")}) > 1
    cfg = json.loads((run / "checkpoint" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["model_type"] == "qwen3_moe"
    assert cfg["slim"]["fallback_input_scales"] == []
    # what vLLM would pick from this quantization_config (its selection rules, restated in slim.formats)
    from slim.formats.vllm_rules import linear_scheme, moe_method, should_ignore_layer

    qcfg = cfg["quantization_config"]
    assert moe_method(qcfg, "model.layers.1.mlp.experts") == "CompressedTensorsW8A8Fp8MoEMethod"
    assert linear_scheme(qcfg, "model.layers.1.self_attn.q_proj") == "CompressedTensorsW8A8Fp8"
    assert should_ignore_layer("lm_head", qcfg["ignore"])
    assert should_ignore_layer("model.layers.1.mlp.gate", qcfg["ignore"])  # the router


def test_w4a8_quantizes_exactly_the_routed_experts(qwen3_moe, cli_runs, reference):
    from slim.quant.schemes import SCHEMES

    run = cli_runs["w4a8"]
    tensors = read_all(run / "checkpoint")
    modules = {m["name"] for m in json.loads((run / "modules.json").read_text())}
    config = qwen3_moe_config()
    assert modules == set(expert_names(config, range(2)))
    model = load_model(str(run / "checkpoint"))
    sims = {n: m for n, m in model.named_modules() if isinstance(m, SimQuantLinear)}
    assert set(sims) == modules
    ref_amax, _ = reference
    with safe_open(qwen3_moe / "model.safetensors", framework="pt") as src:
        for name, sim in sims.items():
            own = {f"{name}.{t}" for t in ("weight_packed", "weight_scale", "weight_shape", "input_scale")}
            assert own <= set(tensors), name
            assert torch.equal(sim.q.input_scale, fp8_scale(torch.tensor([ref_amax[name]]))), name
            expected = SCHEMES["w4a8"].quantize(src.get_tensor(name + ".weight"), torch.tensor(ref_amax[name]), 128,
                                                group_scale_dtype=torch.bfloat16)
            assert torch.equal(sim.q.weight, expected.weight), name
            assert torch.equal(sim.q.weight_scale.float(), expected.weight_scale.float()), name
        for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.gate.weight"):
            assert torch.equal(tensors[n], src.get_tensor(n)), n  # ignored: bf16 as in the source


@pytest.mark.parametrize("scheme", ["fp8_static", "w4a8"])
def test_quantized_checkpoint_loads_back_close_to_bf16(qwen3_moe, cli_runs, scheme):
    """(d) slim's loader reads the export into simulated-quantization Linears; logits stay close to transformers'
    own bf16 model, much closer than the model without its routed experts (so wrong expert weights or scales
    would show). slim's unfused bf16 skeleton computes exactly what transformers' fused experts compute."""
    ids = calibration_ids(qwen3_moe)[:2]
    with torch.no_grad():
        hf = transformers_model(qwen3_moe)
        ref = hf(ids).logits.float()
        base = load_model(str(qwen3_moe))(ids).logits.float()
        quant = load_model(str(cli_runs[scheme] / "checkpoint"))(ids).logits.float()
        for layer in hf.model.layers:
            layer.mlp.experts.down_proj.zero_()
        no_experts = hf(ids).logits.float()
    assert torch.equal(base, ref)
    err, experts_effect = (quant - ref).pow(2).mean().sqrt(), (no_experts - ref).pow(2).mean().sqrt()
    assert 0 < err < 0.6 * experts_effect, (err, experts_effect)
    assert cosine(quant, ref) > 0.99


@pytest.fixture(scope="module")
def dead_expert_model(tmp_path_factory, embedded_model_path):
    """3 layers: layer 0 dense (mlp_only_layers), layers 1-2 MoE; the router of layer 1 never picks expert 3."""
    return save_qwen3_moe(tmp_path_factory.mktemp("qwen3_moe_dead") / "src", embedded_model_path, seed=1,
                          dead=(1, 3), num_hidden_layers=3, mlp_only_layers=[0])


def quantize_in_process(src: Path, out: Path, *overrides):
    from transformers import AutoTokenizer

    from slim.pipeline import quantize_stage

    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", "eval=none", "logger=none", *CALIB, *overrides)
    res = quantize_stage(cfg, src, out, AutoTokenizer.from_pretrained(str(src)))
    return {m["name"]: m for m in res["modules"]}, res


def test_expert_without_tokens_falls_back_and_route_all_experts_reaches_it(dead_expert_model, tmp_path):
    dead = [f"model.layers.1.mlp.experts.3.{p}" for p in PROJ]
    base, res = quantize_in_process(dead_expert_model, tmp_path / "base")
    assert sorted(res["fallbacks"]) == sorted(dead)
    for name in dead:
        peers = [m["input_amax"] for n, m in base.items() if n.startswith("model.layers.1.mlp.experts.")
                 and n.endswith(name.rsplit(".", 1)[1]) and n != name]
        assert base[name]["tokens"] == 0 and base[name]["input_amax"] == max(peers)
    assert "model.layers.0.mlp.down_proj" in base  # the dense layer is an ordinary MLP
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert sorted(config["slim"]["fallback_input_scales"]) == sorted(dead)

    routed, res = quantize_in_process(dead_expert_model, tmp_path / "all", "calibration.route_all_experts=true")
    assert res["fallbacks"] == []
    for name, m in routed.items():
        if ".experts." in name:  # every expert sees every token
            assert m["tokens"] == NUM_SAMPLES * SEQ_LEN, name
        else:  # and the layer outputs are unchanged: every other module sees the same inputs
            assert m["input_amax"] == base[name]["input_amax"], name
    down = "model.layers.1.mlp.experts.3.down_proj"  # its own scale now, not its peers' max
    assert 0 < routed[down]["input_amax"] != base[down]["input_amax"]


def test_routed_only_pattern_fits_layouts_with_dense_layers(dead_expert_model, tmp_path):
    """The layout-independent ignore list: everything but routed experts (dense layer 0, attention, lm_head)."""
    mods, res = quantize_in_process(dead_expert_model, tmp_path / "ckpt", "scheme=w4a8", ROUTED_ONLY)
    config = qwen3_moe_config(num_hidden_layers=3, mlp_only_layers=[0])
    assert set(mods) == set(expert_names(config, (1, 2)))
    assert {"lm_head", "model.layers.0.mlp.down_proj", "model.layers.2.self_attn.o_proj"} <= set(res["ignored"])
