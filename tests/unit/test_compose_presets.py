"""Every option of every config group under conf/, and every experiment preset, composes with the defaults into a
typed SlimConfig that ``slim.config.validate`` accepts; a sweep preset's every job does too.

The options are the YAML files found under conf/ (a new file is tested without editing this module). A preset that
cannot run as it stands, because it asks the user for a value (``???``) or needs a partner option, gets the
explicit overrides in NEEDS, and ``test_needs_are_needed`` proves each one is required, not a cover for a break.
Model paths (model=deepseek_r1's ``/models/DeepSeek-R1-0528`` default) need no override: ``validate`` checks the
configuration, and the pipeline checks the checkpoint directory when it loads it.
"""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from slim.config import ASSETS, SlimConfig, register_configs, validate
from slim.errors import SlimError
from tests.helpers.configs import CONF

# The primary config.yaml is composed in every case; every other YAML is an option of the group named by its folder.
OPTIONS = sorted((str(f.parent.relative_to(CONF)), f.stem) for f in CONF.rglob("*.yaml") if f.parent != CONF)

# What a preset needs before it can run, with the reason; keyed by the option that needs it (also when an experiment
# preset selects that option).
NEEDS: dict[tuple[str, str], tuple[list[str], type[Exception], str]] = {
    # the user's own calibration file: jsonl.yaml has `path: ???` (here the shipped corpus, a real JSON-lines file)
    ("calibration", "jsonl"): ([f"calibration.path={ASSETS / 'data' / 'calibration.jsonl'}"],
                               SlimError, "calibration.path="),
    # a dataset by name: hf.yaml has `dataset: ???`
    ("calibration", "hf"): (["calibration.dataset=wikitext"], SlimError, "calibration.dataset="),
    # without calibration there are no static activation scales: the default scheme=fp8_static is refused
    ("calibration", "none"): (["scheme=w4a8_dynamic"], SlimError, "w4a8_dynamic"),
}


def override(group: str, option: str) -> str:
    return f"+{group}={option}" if group == "experiment" else f"{group}={option}"  # experiment has no default


def compose_all(*overrides: str) -> DictConfig:
    """config.yaml with the overrides, Hydra's own node included (its choices and sweeper params)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def typed(cfg: DictConfig) -> SlimConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        del cfg["hydra"]
    return validate(OmegaConf.to_object(cfg))


def needs(choices: DictConfig) -> list[str]:
    return [o for (group, option), (extra, _, _) in NEEDS.items() if choices.get(group) == option for o in extra]


def assert_contains(composed: dict, expected: dict, where: str) -> None:
    """Every key the YAML sets is in the composed config with that (unresolved) value."""
    for key, value in expected.items():
        assert key in composed, f"{where}.{key} missing"
        if isinstance(value, dict):
            assert_contains(composed[key], value, f"{where}.{key}")
        elif value != "???":  # a value the user must give: NEEDS gives it
            assert composed[key] == value, f"{where}.{key}"


def attr(obj, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def sweep_jobs(params: DictConfig) -> list[list[str]]:
    """The jobs ``-m`` runs from ``hydra.sweeper.params``, split as hydra's BasicSweeper splits them
    (facebookresearch/hydra: hydra/_internal/core_plugins/basic_sweeper.py)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def test_every_group_has_options():
    groups = {group for group, _ in OPTIONS}
    assert {"model", "scheme", "hardware", "calibration", "eval", "logger", "experiment"} <= groups
    assert len(OPTIONS) >= 20


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_and_validates(group, option):
    if group.startswith("hydra/"):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'slim[test]'")
    first = compose_all(override(group, option))
    cfg = compose_all(override(group, option), *needs(first.hydra.runtime.choices))
    choices = cfg.hydra.runtime.choices
    assert choices[group] == option

    raw = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml"))
    header = (CONF / group / f"{option}.yaml").read_text().splitlines()[0]
    package = header.split("@package", 1)[1].strip() if "@package" in header else group.replace("/", ".")
    node = cfg if package == "_global_" else OmegaConf.select(cfg, package)
    for entry in raw.pop("defaults", []):
        if isinstance(entry, dict):  # an experiment's `override /model: deepseek_r1`
            for key, chosen in entry.items():
                assert choices[key.removeprefix("override /")] == chosen, f"{option}: {key}"
    assert_contains(OmegaConf.to_container(node, resolve=False), raw, package)

    if package.startswith("hydra."):  # Hydra's own node: its interpolations (environment defaults) resolve
        OmegaConf.to_container(node, resolve=True)
    slim = typed(cfg)
    if group in ("scheme", "hardware", "calibration", "eval", "logger"):
        assert getattr(slim, group).name == option  # these schemas' `name` is the option's file name

    params = cfg.hydra.sweeper.params or {}
    jobs = sweep_jobs(params) if params else []
    if group == "experiment" and option.startswith("sweep_"):
        assert len(jobs) >= 2, f"{option} sweeps nothing"
    for job in jobs:  # what `python -m slim.main -m +experiment=<sweep>` runs, one job after another
        slim_job = typed(compose_all(override(group, option), *needs(choices), *job))
        for assignment in job:
            parsed = OverridesParser.create().parse_override(assignment)
            assert attr(slim_job, parsed.key_or_group) == parsed.value(), assignment


@pytest.mark.parametrize("key", list(NEEDS), ids=[f"{g}={o}" for g, o in NEEDS])
def test_needs_are_needed(key):
    """Each override NEEDS adds is required: without it the preset is refused, with the error naming the fix."""
    group, option = key
    _, error, fragment = NEEDS[key]
    with pytest.raises(error, match=fragment):
        typed(compose_all(override(group, option)))
