"""Contract tests: a DeepSeek-V3 checkpoint slim wrote with ``scheme=w4a8 scheme.format=w4afp8`` (the real CLI, on
the embedded model: block-FP8 source, and its bf16 conversion) against the rules of the engines that load it.

Each rule names the file it is restated from (read, not imported; see docs/w4afp8.md for why no engine runs here):
[SGL-Q]    sglang python/sglang/srt/layers/quantization/w4afp8.py (W4AFp8Config, W4AFp8MoEMethod)
[SGL-L]    sglang python/sglang/srt/models/deepseek_common/deepseek_weight_loader.py (expert_params_mapping,
           make_expert_input_scale_params_mapping: ``experts.E.w1/w2/w3.input_scale``; unknown names are skipped)
[SGL-MOE]  sglang python/sglang/srt/layers/moe/fused_moe_triton/layer.py (_weight_loader_impl: w1/w3 input scales
           must agree within 1e-5 against a bf16 parameter; make_expert_params_mapping)
[SGL-CFG]  sglang python/sglang/srt/configs/model_config.py (config.json quantization_config first,
           hf_quant_config.json MIXED_PRECISION -> w4afp8 only without it)
[TRT-CFG]  TensorRT-LLM tensorrt_llm/_torch/model_config.py (hf_quant_config.json first; MIXED_PRECISION ->
           quant_cfg.json "quantized_layers" and "kv_cache_quant_algo")
[TRT-MOE]  TensorRT-LLM tensorrt_llm/_torch/modules/fused_moe/quantization.py (WInt4AFP8FusedMoEMethod:
           ``{E}.w1/w3/w2.input_scale``, ``weight_scale_inv``, K a multiple of 128, max input scale over all experts)
[TRT-W]    TensorRT-LLM examples/quantization/quantize_mixed_precision_moe.py (the reference writer's layer names)
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from slim.formats import FORMATS
from slim.formats.w4afp8 import unpack_nibbles
from slim.models.checkpoint import CheckpointReader
from slim.models.loading import load_model
from slim.models.simulated import SimQuantLinear
from slim.quant.fp8 import FP8_DTYPE, dequantize_fp8_block, fp8_scale
from slim.models.input_scales import representable_amax
from slim.quant.schemes import SCHEMES
from tests.helpers.checkpoints import read_all

pytestmark = pytest.mark.slow
FMT = FORMATS["w4afp8"]


def slim_main(*args, cwd, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def quantize(tmp, *args):
    run = tmp / "run"
    proc = slim_main("scheme=w4a8", "eval=none", "logger=none", "calibration.num_samples=8", f"hydra.run.dir={run}",
                     *args, cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run



@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    """From the embedded model as shipped (block FP8, as DeepSeek-R1 is published)."""
    return quantize(tmp_path_factory.mktemp("w4afp8_fp8"), "scheme.format=w4afp8")


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """From its bf16 conversion (model=tiny_deepseek_bf16): the other Linears are quantized to block FP8 here."""
    return quantize(tmp_path_factory.mktemp("w4afp8_bf16"), "scheme.format=w4afp8", "model=tiny_deepseek_bf16")


def source_config(path):
    return json.loads((path / "config.json").read_text())


def moe_layers(config):
    freq = config.get("moe_layer_freq", 1)
    return [i for i in range(config["num_hidden_layers"]) if i >= config["first_k_dense_replace"] and i % freq == 0]


def test_every_expected_tensor_is_there_with_its_name_dtype_and_shape(fp8_run, embedded_model_path):
    ckpt = fp8_run / "checkpoint"
    cfg, got = source_config(embedded_model_path), read_all(ckpt)
    src = CheckpointReader(embedded_model_path, load_type="fp8")
    H, I, E = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["n_routed_experts"]
    expected_scales = set()
    for layer in moe_layers(cfg):
        for e in range(E):
            base = f"model.layers.{layer}.mlp.experts.{e}"
            # [SGL-Q] create_weights: w13_weight int8 [E, 2I, H/2], w2_weight int8 [E, H, I/2];
            # *_weight_scale_inv fp32 [E, 2I, H/128] and [E, H, I/128]; [SGL-L] loads experts.E.{gate,up,down}_proj
            for proj, (n, k) in {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}.items():
                w, s = got[f"{base}.{proj}.weight"], got[f"{base}.{proj}.weight_scale_inv"]
                assert (w.dtype, tuple(w.shape)) == (torch.int8, (n, k // 2)), f"{base}.{proj}.weight"
                assert (s.dtype, tuple(s.shape)) == (torch.float32, (n, k // 128)), f"{base}.{proj}.weight_scale_inv"
            # [SGL-L]/[SGL-MOE] make_expert_input_scale_params_mapping; [TRT-MOE] weights[f"{e}.w1.input_scale"]
            for shard in ("w1", "w2", "w3"):
                t = got[f"{base}.{shard}.input_scale"]
                assert (t.dtype, tuple(t.shape)) == (torch.float32, (1,))
                expected_scales.add(f"{base}.{shard}.input_scale")
    # SGLang skips names it does not know: the checkpoint holds exactly the source's tensors plus the input scales
    # (a misnamed tensor would show up on one side of this equality)
    assert set(got) == set(src.names()) | expected_scales
    # [SGL-Q] every LinearBase is Fp8LinearMethod (block FP8, weight_block_size [128, 128]): no bf16 decoder Linear
    for name, t in got.items():
        if name.endswith("_proj.weight") or name.endswith("_with_mqa.weight"):
            assert t.dtype in (FP8_DTYPE, torch.int8), f"{name} is {t.dtype}"
            assert f"{name}_scale_inv" in got


def test_experts_reproduce_slims_int4_codes_and_scales_exactly(fp8_run, embedded_model_path):
    got = read_all(fp8_run / "checkpoint")
    src = CheckpointReader(embedded_model_path, load_type="fp8")
    for name in ("model.layers.1.mlp.experts.0.gate_proj", "model.layers.2.mlp.experts.7.down_proj",
                 "model.layers.3.mlp.experts.15.up_proj"):
        weight = src.get(name + ".weight", torch.bfloat16)  # what slim quantizes: the source decoded to bf16
        ref = SCHEMES["w4a8"].quantize(weight, torch.tensor(1.0), 128, "minmax", torch.bfloat16)
        packed, scale = got[name + ".weight"], got[name + ".weight_scale_inv"]
        assert torch.equal(unpack_nibbles(packed), ref.weight)  # nibble order: 2j low, 2j+1 high
        lo = ref.weight[:, 0::2].view(torch.uint8) & 0x0F
        assert torch.equal(packed.view(torch.uint8) & 0x0F, lo)
        assert torch.equal(scale, ref.weight_scale)  # [N, K/128] rows = output channels, bf16 values in fp32
        # multiplied, not divided: code * scale is close to the source weight
        w = FMT.dequantize(FMT.read(name, {k: got[k] for k in FMT.quantized_modules(got)[name]}), torch.float32)
        assert (w - weight.float()).norm() / weight.float().norm() < 0.15


def test_fp8_block_tensors_are_the_source_bytes(fp8_run, embedded_model_path):
    got = read_all(fp8_run / "checkpoint")
    src = CheckpointReader(embedded_model_path, load_type="fp8")
    compared = 0
    for name in src.names():
        raw = src.raw(name)
        if raw.dtype == FP8_DTYPE and ".experts." not in name.replace("shared_experts", ""):
            for n in (name, name + "_scale_inv"):
                a, b = got[n], src.raw(n)
                assert a.dtype == b.dtype and a.shape == b.shape
                assert a.contiguous().view(torch.uint8).numpy().tobytes() == \
                    b.contiguous().view(torch.uint8).numpy().tobytes(), n
            compared += 1
    assert compared >= 20  # attention, shared experts, the dense layer


def test_input_scales_gate_equals_up_and_each_layer_writes_its_max(fp8_run):
    got = read_all(fp8_run / "checkpoint")
    modules = {m["name"]: m for m in json.loads((fp8_run / "modules.json").read_text())}
    for layer in (1, 2, 3):
        experts = range(16)
        w1 = [got[f"model.layers.{layer}.mlp.experts.{e}.w1.input_scale"] for e in experts]
        w3 = [got[f"model.layers.{layer}.mlp.experts.{e}.w3.input_scale"] for e in experts]
        w2 = [got[f"model.layers.{layer}.mlp.experts.{e}.w2.input_scale"] for e in experts]
        # [SGL-MOE] w1 and w3 of an expert agree (SGLang raises beyond 1e-5); bit-equal here
        assert all(torch.equal(a, b) for a, b in zip(w1, w3))
        # layer_max (default for w4afp8): one value per layer and shard, whatever the expert split over ranks
        assert all(torch.equal(a, w1[0]) for a in w1) and all(torch.equal(a, w2[0]) for a in w2)
        # survives the engines' bf16 parameter ([SGL-Q] w13_input_scale dtype bfloat16)
        assert torch.equal(w1[0].to(torch.bfloat16).float(), w1[0])
        # modules.json keeps each expert's observed amax; the written scale is their max / 448, rounded up to bf16
        observed = [modules[f"model.layers.{layer}.mlp.experts.{e}.{p}"]["input_amax"]
                    for e in experts for p in ("gate_proj", "up_proj")]
        assert len(set(observed)) > 1  # per-expert values really differ
        assert torch.equal(w1[0], fp8_scale(representable_amax(torch.tensor([max(observed)]), torch.bfloat16)))
        down = [modules[f"model.layers.{layer}.mlp.experts.{e}.down_proj"]["input_amax"] for e in experts]
        assert torch.equal(w2[0], fp8_scale(representable_amax(torch.tensor([max(down)]), torch.bfloat16)))


def test_config_routes_agree_for_both_engines(fp8_run, embedded_model_path):
    ckpt = fp8_run / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    qc = config["quantization_config"]
    # [SGL-CFG] config.json's quantization_config is read first; "w4afp8" is W4AFp8Config's get_name()
    assert qc["quant_method"] == "w4afp8" and qc["weight_block_size"] == [128, 128] and qc["group_size"] == 128
    # [TRT-CFG] hf_quant_config.json is read before config.json: {"quantization": {...}} wrapper, MIXED_PRECISION
    hf = json.loads((ckpt / "hf_quant_config.json").read_text())
    assert hf["quantization"]["quant_algo"] == "MIXED_PRECISION"
    # [SGL-CFG] _parse_modelopt_quant_config maps MIXED_PRECISION without NVFP4 layers to "w4afp8": the
    # hf_quant_config route, were config.json's block absent, names the same SGLang method
    qcfg = json.loads((ckpt / "quant_cfg.json").read_text())
    assert "kv_cache_quant_algo" in qcfg  # [TRT-CFG] indexes it unconditionally
    layers = qcfg["quantized_layers"]
    assert not any(v["quant_algo"].upper() in ("NVFP4", "W4A16_NVFP4") for v in layers.values())
    got = read_all(ckpt)
    src_cfg = source_config(embedded_model_path)
    # [TRT-W] fused names: fused_a = q_a_proj + kv_a_proj_with_mqa, gate_up_proj = gate_proj + up_proj
    unfused = {"fused_a": ("q_a_proj", "kv_a_proj_with_mqa"), "gate_up_proj": ("gate_proj", "up_proj")}
    for module, algo in layers.items():
        prefix, _, last = module.rpartition(".")
        if algo == {"quant_algo": "W4A8_AWQ"}:
            assert last == "experts" and got[f"{module}.0.gate_proj.weight"].dtype == torch.int8
        else:
            assert algo == {"quant_algo": "FP8_BLOCK_SCALES"}
            for part in unfused.get(last, (last,)):
                assert got[f"{prefix}.{part}.weight"].dtype == FP8_DTYPE, module
    moe = {f"model.layers.{i}.mlp.experts" for i in moe_layers(src_cfg)}
    assert {m for m, a in layers.items() if a["quant_algo"] == "W4A8_AWQ"} == moe
    assert not (ckpt / "model.safetensors").exists() and (ckpt / "tokenizer.json").is_file()


def test_bf16_source_other_linears_are_deepseek_block_fp8(bf16_run, fp8_run):
    got, ref = read_all(bf16_run / "checkpoint"), read_all(fp8_run / "checkpoint")
    assert set(got) == set(ref)
    for name, t in got.items():
        if t.dtype == FP8_DTYPE:
            scale = got[name + "_scale_inv"]
            assert scale.dtype == torch.float32 and tuple(scale.shape) == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
            # amax / 448 per 128x128 block (DeepSeek's conversion): some code of every block is +-448
            for r in range(0, t.shape[0], 128):
                for c in range(0, t.shape[1], 128):
                    assert float(t[r:r + 128, c:c + 128].float().abs().amax()) == 448.0, (name, r, c)
            # decoding gives back the bf16 source within FP8's precision (the source was itself block FP8)
            w_ref = dequantize_fp8_block(ref[name], ref[name + "_scale_inv"], (128, 128), torch.float32)
            w = dequantize_fp8_block(t, scale, (128, 128), torch.float32)
            assert (w - w_ref).norm() / w_ref.norm() < 0.05, name


def test_slims_reader_loads_the_layout_bit_exact(fp8_run, embedded_model_path):
    ckpt = fp8_run / "checkpoint"
    got = read_all(ckpt)
    model = load_model(str(ckpt))
    experts = [(n, m) for n, m in model.named_modules() if isinstance(m, SimQuantLinear)]
    assert len(experts) == 3 * 16 * 3 and all(".experts." in n for n, _ in experts)
    for name, mod in experts[::7]:
        assert torch.equal(mod.q.weight, unpack_nibbles(got[name + ".weight"]))
        assert torch.equal(mod.q.weight_scale, got[name + ".weight_scale_inv"])
        shard = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[name.rsplit(".", 1)[1]]
        assert torch.equal(mod.q.input_scale, got[f"{name.rsplit('.', 1)[0]}.{shard}.input_scale"])
    o_proj = model.model.layers[1].self_attn.o_proj.weight
    src = CheckpointReader(embedded_model_path, load_type="fp8")
    assert torch.equal(o_proj, src.get("model.layers.1.self_attn.o_proj.weight", torch.bfloat16))


def test_mode_eval_scores_the_checkpoint(fp8_run, tmp_path):
    proc = slim_main("mode=eval", f"model.path={fp8_run / 'checkpoint'}", "eval.limit=8", "logger=none",
                     f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    ppl = results["metrics"]["model"]["slim_text_ppl"]["word_perplexity"]
    assert 1 < ppl < 1e4


def test_plan_counts_this_layouts_bytes(fp8_run, tmp_path):
    written = sum(t.numel() * t.element_size() for t in read_all(fp8_run / "checkpoint").values())
    proc = slim_main("mode=plan", "scheme=w4a8", "scheme.format=w4afp8", "logger=none", f"hydra.run.dir={tmp_path}/p",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = json.loads((tmp_path / "p" / "results.json").read_text())["plan"]["checkpoint_bytes"]
    # exact but for the routers' e_score_correction_bias (a buffer, fp32 [16] in 3 MoE layers): the plan counts
    # parameters only
    assert written - planned == 3 * 16 * 4, (planned, written)


def test_refuses_an_ignore_list_that_makes_attention_int4(tmp_path):
    proc = slim_main("scheme=w4a8", "scheme.format=w4afp8", "scheme.ignore_layers=[lm_head]", "eval=none",
                     "logger=none", f"hydra.run.dir={tmp_path}/r", cwd=tmp_path)
    assert proc.returncode == 2
    assert "routed experts only" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoint" / "config.json").exists()


def test_sweep_over_formats_plans_r1_in_both_layouts(tmp_path):
    """``-m scheme.format=compressed-tensors,w4afp8`` on DeepSeek-R1's config.json (mode=plan needs nothing else)."""
    from slim.config import ASSETS

    sweep = tmp_path / "sweep"
    proc = slim_main("-m", "mode=plan", "model=deepseek_r1", f"model.path={ASSETS / 'configs' / 'deepseek_r1'}",
                     "hardware=h20x8", "scheme=w4a8", "scheme.format=compressed-tensors,w4afp8", "logger=none",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sizes = {}
    for results in sweep.rglob("results.json"):  # job dirs are named by their overrides (the path's slashes nest)
        name = re.search(r"scheme\.format=([^,]+)", results.parent.name)[1]
        sizes[name] = json.loads(results.read_text())["plan"]["checkpoint_bytes"]
    assert set(sizes) == {"compressed-tensors", "w4afp8"}
    # block-FP8 attention/shared/dense (half of bf16) outweighs fp32 group scales (twice bf16) on R1
    assert sizes["w4afp8"] < sizes["compressed-tensors"]


def run_quantize(src, out, *overrides):
    """quantize_stage in this process, on a random DeepSeek-V3 in R1's layout (tests/conftest.py)."""
    from tests.helpers.configs import compose_config
    from transformers import AutoTokenizer

    from slim.pipeline import quantize_stage

    cfg = compose_config(f"model.path={src}", "eval=none", "logger=none", "calibration.num_samples=8",
                         "calibration.seq_len=64", "scheme=w4a8", *overrides)
    return quantize_stage(cfg, src, out, AutoTokenizer.from_pretrained(str(src)))


def test_moe_input_scale_expert_keeps_each_experts_scale(random_deepseek, tmp_path):
    res = run_quantize(random_deepseek, tmp_path / "ckpt", "scheme.format=w4afp8", "export.moe_input_scale=expert")
    got = read_all(tmp_path / "ckpt")
    amax = {m["name"]: m["input_amax"] for m in res["modules"]}
    w1 = []
    for e in range(8):
        base = f"model.layers.1.mlp.experts.{e}"
        assert torch.equal(got[f"{base}.w1.input_scale"], got[f"{base}.w3.input_scale"])
        want = fp8_scale(representable_amax(torch.tensor([amax[f"{base}.gate_proj"]]), torch.bfloat16))
        assert torch.equal(got[f"{base}.w1.input_scale"], want)
        w1.append(float(got[f"{base}.w1.input_scale"]))
    assert len(set(w1)) > 1


def test_moe_input_scale_layer_max_for_compressed_tensors(random_deepseek, tmp_path):
    res = run_quantize(random_deepseek, tmp_path / "ckpt", "export.moe_input_scale=layer_max")
    got = read_all(tmp_path / "ckpt")
    amax = {m["name"]: m["input_amax"] for m in res["modules"]}
    for proj, peers in (("gate_proj", ("gate_proj", "up_proj")), ("up_proj", ("gate_proj", "up_proj")),
                        ("down_proj", ("down_proj",))):
        scales = {float(got[f"model.layers.1.mlp.experts.{e}.{proj}.input_scale"]) for e in range(8)}
        top = max(amax[f"model.layers.1.mlp.experts.{e}.{p}"] for e in range(8) for p in peers)
        assert scales == {float(fp8_scale(torch.tensor([top])))}  # fp32 scales, no bf16 rounding in this format
