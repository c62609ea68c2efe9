"""The typed SlimConfig a command line composes, through Hydra's compose API over the repository's conf/."""

from __future__ import annotations

from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"


def compose_config(*overrides):
    """The typed SlimConfig that ``python -m slim.main <overrides>`` would run."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from slim.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
