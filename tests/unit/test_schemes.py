"""Schemes are data: presets are YAML files of compressed-tensors QuantizationArgs, behaviour dispatches on them."""

import json
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from tests.helpers.configs import compose_config as make

from slim.config import validate
from slim.errors import SlimError
from slim.formats import FORMATS
from slim.formats import vllm_rules
from slim.quant.schemes import SCHEMES, WEIGHT_HANDLERS, Scheme, dequantize_weight, scheme_from_config

CONF = Path(__file__).resolve().parents[2] / "conf" / "scheme"
PRESETS = sorted(p.stem for p in CONF.glob("*.yaml"))


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_file_composes_to_a_scheme(name):
    cfg = validate(make(f"scheme={name}"))
    scheme = scheme_from_config(cfg.scheme)
    assert scheme.name == name
    if name in SCHEMES:  # the built-ins the code reads checkpoints by: the YAML says the same
        assert scheme == SCHEMES[name]


def test_a_preset_defined_by_its_file_alone():
    """fp8_dynamic has no entry in code: its YAML (FP8 weights, per-token dynamic activations) is all there is."""
    assert "fp8_dynamic" not in SCHEMES and "fp8_dynamic" in PRESETS
    scheme = scheme_from_config(make("scheme=fp8_dynamic").scheme)
    assert (scheme.weight_bits, scheme.per_group, scheme.static_activations) == (8, False, False)
    assert scheme.input_activations.strategy == "token"
    config = FORMATS["compressed-tensors"].quantization_config(scheme, ["lm_head"])
    # vLLM builds its FP8 W8A8 scheme for it (dynamic per-token activations) on Hopper
    assert vllm_rules.linear_scheme(config) == "CompressedTensorsW8A8Fp8"


def test_group_size_sweeps_reach_the_weights():
    assert scheme_from_config(make("scheme=w4a8", "scheme.group_size=64").scheme).weights.group_size == 64
    assert scheme_from_config(make("scheme=w4a8_dynamic", "scheme.group_size=32").scheme).weights.group_size == 32


@pytest.mark.parametrize(("overrides", "message"), [
    (["scheme.bits=4"], "no weight handler for float/tensor/4-bit weights; slim quantizes float/tensor/8-bit, "
                        "int/group/4-bit"),
    (["scheme=w4a8", "scheme.quant_method=per-tensor", "scheme.group_size=null"], "int/tensor/4-bit"),
    (["scheme.input_activations.num_bits=4"], "activations are quantized to FP8"),
])
def test_a_scheme_slim_cannot_run_names_what_it_can(overrides, message):
    with pytest.raises(SlimError, match=message):
        validate(make(*overrides))


def test_quantize_dispatches_through_the_handler():
    """Each handler's round trip, against the definitions: FP8 amax/448 per tensor, int4 absmax/7.5 per group."""
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    fp8 = SCHEMES["fp8_static"].quantize(w, torch.tensor(3.0))
    assert torch.equal(fp8.weight_scale, (w.abs().max() / 448).reshape(1))
    assert torch.equal(fp8.input_scale, torch.tensor([3.0 / 448]))
    w4 = SCHEMES["w4a8_dynamic"].quantize(w, None, group_size=128)
    assert w4.input_scale is None and w4.weight_scale.shape == (16, 2)
    assert torch.equal(w4.weight_scale, w.reshape(16, 2, 128).abs().amax(-1) / 7.5)
    back = dequantize_weight(w4)
    assert (back - w).abs().le(w4.weight_scale.repeat_interleave(128, 1) * (0.5 + 1e-5)).all()  # half a step
    assert set(WEIGHT_HANDLERS) == {("float", "tensor", 8), ("int", "group", 4)}


def test_unknown_weight_strategy_is_refused():
    with pytest.raises(ValueError, match="no weight handler for int/channel/8-bit"):
        Scheme("w8", QuantizationArgs(num_bits=8, type="int", strategy="channel"), None)


@pytest.mark.slow
def test_yaml_only_preset_runs_end_to_end(tmp_path):
    """The real CLI quantizes with the YAML-only preset, weights only, and slim reads its checkpoint back."""
    from tests.helpers.cli import slim_main

    run = tmp_path / "run"
    proc = slim_main("scheme=fp8_dynamic", "calibration=none", "eval=none", "logger=none", f"hydra.run.dir={run}",
                     cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    group = config["quantization_config"]["config_groups"]["group_0"]
    assert group["format"] == "float-quantized"
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"
    assert config["slim"]["scheme"] == "fp8_dynamic"
    from safetensors import safe_open

    with safe_open(str(next((run / "checkpoint").glob("*.safetensors"))), "pt") as f:
        names = set(f.keys())
    assert any(n.endswith("q_a_proj.weight_scale") for n in names)
    assert not any(n.endswith("input_scale") for n in names)  # dynamic: no calibrated scale is stored
