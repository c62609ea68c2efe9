"""Activation observers through the quantize stage of a dense Llama: recorded in config.json's slim block, and
each searched clip at most the observed absmax (the minmax run's)."""

import json

import pytest
from transformers import AutoTokenizer

from slim.pipeline import quantize_stage
from tests.helpers.configs import compose_config
from tests.integration.test_dense import save_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory, embedded_model_path):
    return save_llama(tmp_path_factory.mktemp("llama_obs") / "llama", embedded_model_path)[0]


def run(src, out, *overrides):
    cfg = compose_config(f"model.path={src}", "model.load_type=bf16", "scheme.ignore_layers=[lm_head]", "eval=none",
                         "logger=none", "calibration.num_samples=4", "calibration.seq_len=64", *overrides)
    res = quantize_stage(cfg, src, out, AutoTokenizer.from_pretrained(str(src)))
    return {m["name"]: m for m in res["modules"]}, json.loads((out / "config.json").read_text())["slim"]


def test_observers_recorded_and_clips_bounded_by_the_absmax(llama, tmp_path):
    minmax, slim_block = run(llama, tmp_path / "minmax", "scheme=fp8_static")
    assert slim_block["activation_observer"] == "minmax"
    for observer in ("mse", "percentile"):
        mods, slim_block = run(llama, tmp_path / observer, "scheme=fp8_static",
                               f"scheme.activation_observer={observer}")
        assert slim_block["activation_observer"] == observer
        assert mods.keys() == minmax.keys()
        for name, m in mods.items():
            assert 0 < m["input_amax"] <= minmax[name]["input_amax"], (observer, name)
            assert m["input_scale"] == pytest.approx(m["input_amax"] / 448, rel=1e-6)
    _, dynamic = run(llama, tmp_path / "dynamic", "scheme=w4a8_dynamic")
    assert dynamic["activation_observer"] is None  # no static input scale to choose
