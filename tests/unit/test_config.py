"""Config groups compose into the typed schema; bad values fail early with the fix."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from slim.config import SlimConfig, validate
from slim.errors import SlimError
from tests.helpers.configs import compose_config as make


def test_default_composes_to_typed_config():
    cfg = make()
    assert isinstance(cfg, SlimConfig)
    assert (cfg.model.name, cfg.scheme.name, cfg.hardware.name, cfg.calibration.name) == (
        "tiny_deepseek", "fp8_static", "cpu", "embedded")
    assert Path(cfg.model.path).name == "tiny_deepseek" and cfg.model.load_type == "fp8"
    assert cfg.scheme.ignore_layers == ["lm_head"]
    validate(cfg)


def test_seed_keys_exist_with_their_meaning():
    cfg = make("scheme=w4a8")
    for key in ("name", "load_type", "low_cpu_mem_usage", "device_map"):
        assert hasattr(cfg.model, key)
    for key in ("name", "bits", "low_memory", "quant_method", "group_size", "ignore_layers"):
        assert hasattr(cfg.scheme, key)
    assert (cfg.scheme.quant_method, cfg.scheme.group_size) == ("per-group", 128)


@pytest.mark.parametrize("group,bad", [("scheme", "int3"), ("hardware", "tpu"), ("model", "gpt5"), ("eval", "mmlu_pro")])
def test_unknown_choice_lists_valid_ones(group, bad):
    with pytest.raises(ConfigCompositionException, match="Available options"):
        make(f"{group}={bad}")


def test_wrong_type_fails_at_compose():
    with pytest.raises((ValidationError, ConfigCompositionException)):
        make("calibration.num_samples=many")


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.load_type=int8"], "model.load_type"),
        (["scheme=w4a8", "scheme.group_size=null"], "group_size"),
        (["model.device_map=cuda"], "device_map=cpu"),
        (["scheme.low_memory=false"], "needs scheme.low_memory=true"),
        (["calibration.seq_len=0"], "positive"),
        (["eval.backend=vlm"], "hf, streamed, vllm"),
        (["scheme.weight_observer=percentile"], "minmax, mse"),
        (["export.checksum=md5"], "xxh3_128, sha256"),
        (["scheme.format=gguf"], "scheme.format='gguf' is not valid; choose one of: compressed-tensors, fp8_native"),
    ],
)
def test_validation_names_the_fix(overrides, message):
    with pytest.raises(SlimError, match=message):
        validate(make(*overrides))


@pytest.mark.parametrize("scheme", ["fp8_static", "w4a8"])
def test_calibration_off_refuses_static_activation_schemes(scheme):
    with pytest.raises(SlimError, match=f"scheme={scheme} stores static activation scales.*: w4a8_dynamic$"):
        validate(make(f"scheme={scheme}", "calibration=none"))
    with pytest.raises(SlimError, match="mode=sensitivity ranks modules by calibration loss"):
        validate(make("scheme=w4a8_dynamic", "calibration=none", "mode=sensitivity"))


def test_calibration_off_composes_for_dynamic_activations():
    cfg = validate(make("scheme=w4a8_dynamic", "calibration=none"))
    assert (cfg.calibration.source, cfg.calibration.num_samples) == ("none", 0)


def test_format_names_are_the_formats():
    """validate checks scheme.format against names it knows without importing the formats (compressed-tensors
    takes ~1.7 s to import); they must be the registry's."""
    from slim.config import FORMAT_NAMES
    from slim.formats import FORMATS

    assert FORMAT_NAMES == tuple(FORMATS)
