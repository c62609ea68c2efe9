"""The scaffold every mode runs in: stage timings, ``results.json``, the W&B tracker and the exit code.

    with RunRecord(cfg, resolved, mode="quantize") as run:
        with run.stage("load"):
            ...
        run.results["metrics"] = ...
        return run.finish()          # timings + peak memory into results.json and the tracker's summary

Leaving the block by an exception finishes the tracker with exit code 1; ``finish()`` marks the run successful.
Ranks other than 0 pass ``track=False``: they neither write records nor open a W&B run. The W&B run's id comes
from the run directory and the mode (a rerun there resumes it), its name from model, scheme, algorithm and run
directory (:func:`slim.tracking.run_id`, :func:`slim.tracking.run_name`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from slim import __version__
from slim.config import SlimConfig
from slim.tracking import Tracker, peak_memory, run_id, run_name, write_results

log = logging.getLogger(__name__)


class Stages:
    """Wall seconds per stage, with a log line each."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)
        log.info("stage %-15s %7.1f s   peak host RSS %.0f MiB", name, self.seconds[name], peak_memory()["host_rss_mib"])


class RunRecord:
    """One run's records (see module docstring). ``results`` starts with what every mode reports."""

    def __init__(self, cfg: SlimConfig, resolved: dict[str, Any], mode: str | None = None, track: bool = True,
                 **fields: Any):
        self.run_dir = Path(cfg.run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.track = track
        self.stage = Stages()
        mode = mode or cfg.mode
        self.results: dict[str, Any] = {"slim_version": __version__, "mode": mode,
                                        "model": cfg.model.name, "scheme": cfg.scheme.name,
                                        "algorithm": cfg.algorithm.name,
                                        "run_dir": str(self.run_dir), **fields, "metrics": {}}
        logger = cfg.logger if track else dataclasses.replace(cfg.logger, mode="disabled")
        self.tracker = Tracker(logger, self.run_dir, resolved, run_id=run_id(self.run_dir, mode),
                               name=run_name(cfg.model.name, cfg.scheme.name, cfg.algorithm.name, self.run_dir, mode))
        self.exit_code = 1

    def __enter__(self) -> RunRecord:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tracker.finish(self.exit_code)

    def save(self) -> None:
        """Write ``results.json`` as it stands (a later failure keeps what is already there)."""
        if self.track:
            write_results(self.run_dir, self.results)

    def finish(self, summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record timings and peak memory, write ``results.json``, fill the tracker's summary; the run succeeded."""
        self.results["timings_s"] = self.stage.seconds
        self.results["peak_memory"] = peak_memory()
        self.save()
        self.tracker.summary({**(summary or {}), **{f"time/{k}": v for k, v in self.stage.seconds.items()},
                              **{f"memory/{k}": v for k, v in self.results["peak_memory"].items()}})
        self.exit_code = 0
        return self.results
