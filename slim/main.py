"""Entry point: ``python -m slim.main [group=option ...] [key=value ...]`` (Hydra; ``-m`` for sweeps)."""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from slim.config import SlimConfig, register_configs
from slim.errors import SlimError
from slim.paths import conf_dir

register_configs()
log = logging.getLogger("slim")


# the checkout's conf/, or the copy a wheel ships in the package (slim.paths); an absolute path to Hydra
@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from slim import pipeline
    from slim.ranks import install_rank_logging

    install_rank_logging()  # under torchrun: "[rank r/W]" on every line, a log file per rank
    from slim.preflight import preflight
    from slim.launch import launch, needs_launch
    from slim.tracking import sweep_group

    cfg.run_dir = HydraConfig.get().runtime.output_dir
    resolved = OmegaConf.to_container(cfg, resolve=True)
    typed: SlimConfig = OmegaConf.to_object(cfg)
    try:
        if typed.mode not in ("plan", "sensitivity") and needs_launch(typed.hardware):  # one process per rank
            preflight(typed)
            # this job's own overrides: in a multirun they hold this job's values, not the sweep lists
            overrides = list(HydraConfig.get().overrides.task)
            if not typed.logger.group and (group := sweep_group()):  # ranks are single runs: pass the sweep's group
                overrides.append(f"logger.group={group}")
            sys.exit(launch(typed.hardware, overrides, typed.run_dir))
        pipeline.run(typed, resolved)
    except SlimError as exc:
        log.error("%s", exc)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
