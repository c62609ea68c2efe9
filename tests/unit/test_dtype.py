"""model.dtype=auto: bf16 where matmuls run natively in bf16 (GPUs, AVX-512/AMX CPUs), float32 on other CPUs."""

import logging

import pytest
import torch

from slim.models import loading


@pytest.mark.parametrize(("capability", "want"), [
    ("AVX2", "float32"), ("DEFAULT", "float32"), ("AVX512", "bfloat16"), ("AVX512_BF16", "bfloat16"),
])
def test_auto_follows_the_cpu_capability(monkeypatch, caplog, capability, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    with caplog.at_level(logging.INFO, logger="slim.models.loading"):
        assert loading.resolve_dtype("auto", "cpu") == want
    assert f"computing in {want}" in caplog.text and capability in caplog.text
    assert loading.torch_dtype("auto", "cpu") == loading.DTYPES[want]


def test_auto_is_bf16_on_gpus_and_explicit_dtypes_are_kept(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert loading.resolve_dtype("auto", "cuda") == "bfloat16"
    assert loading.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert loading.resolve_dtype("float32", "cuda") == "float32"


@pytest.mark.slow
def test_cli_records_the_resolved_dtype(tmp_path, monkeypatch):
    """The exported config.json and the W&B/record config carry the dtype auto resolved to, never 'auto'."""
    import json

    from tests.helpers.cli import slim_main

    run = tmp_path / "run"
    proc = slim_main("eval=none", "logger=none", "calibration.num_samples=2", "calibration.seq_len=16",
                     f"hydra.run.dir={run}", cwd=tmp_path, env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model.dtype=auto: computing in float32" in proc.stdout + proc.stderr
    config = json.loads((run / "checkpoint" / "config.json").read_text())
    assert config["torch_dtype"] == "float32"
