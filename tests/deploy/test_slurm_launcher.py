"""hydra/launcher=slurm_h20 composes with slim's config and reaches submitit (no SLURM on these machines)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'slim[slurm]'")


def slim_main(*args, cwd, env=None):
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=300)


def test_slurm_launcher_config_composes(tmp_path):
    proc = slim_main("hydra/launcher=slurm_h20", "hardware=h20x8", "scheme=w4a8", "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    launcher = yaml.safe_load(proc.stdout)["hydra"]["launcher"]
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher["nodes"] == 1 and launcher["tasks_per_node"] == 1 and launcher["gpus_per_node"] == 8
    assert launcher["additional_parameters"] == {"exclusive": True}


def test_partition_and_account_come_from_the_environment(monkeypatch):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from slim.config import register_configs

    register_configs()
    conf = str(Path(__file__).resolve().parents[2] / "conf")
    monkeypatch.setenv("SLIM_SLURM_PARTITION", "h20")
    monkeypatch.delenv("SLIM_SLURM_ACCOUNT", raising=False)
    with initialize_config_dir(config_dir=conf, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_h20"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["partition"] == "h20" and launcher["account"] is None


def test_multirun_goes_to_submitit(tmp_path):
    """A two-point sweep is handed to submitit's SLURM executor, which stops here because this machine has no srun."""
    sweep = tmp_path / "sweep"
    proc = slim_main("-m", "hydra/launcher=slurm_h20", "hardware=h20x8", "scheme=w4a8", "scheme.group_size=64,128",
                     f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode != 0
    assert 'Could not detect "srun"' in proc.stderr
    multirun = yaml.safe_load((sweep / "multirun.yaml").read_text())
    assert multirun["hydra"]["launcher"]["gpus_per_node"] == 8
    assert "scheme.group_size=64,128" in multirun["hydra"]["overrides"]["task"]
