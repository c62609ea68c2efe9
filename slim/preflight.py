"""Everything checked before any heavy work: the configuration's fields (:func:`slim.config.validate`), then the
evaluation settings (:func:`slim.eval_checks.check_eval`: backend available, layout servable, tasks resolvable
offline, memory). The entry point and every rank run it first; each failure is one SlimError naming the fix."""

from __future__ import annotations

from slim.config import SlimConfig, validate
from slim.eval_checks import check_eval


def preflight(cfg: SlimConfig) -> SlimConfig:
    validate(cfg)
    check_eval(cfg)
    return cfg
