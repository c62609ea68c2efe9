"""What a run directory holds, and whether a rerun may reuse it.

A run's exported bytes depend on the source checkpoint, slim's version and every setting that matters: their
digest (``run_fingerprint``) is stored in the checkpoint's ``config.json`` and in every commit point. A rerun with
the same fingerprint reuses a finished checkpoint or resumes an interrupted export (``slim.resume``); one with
another fingerprint is refused unless ``overwrite=true``. ``results.json`` of an earlier attempt of the same run
lets a rerun skip finished evaluation stages.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from slim import __version__
from slim.config import SlimConfig
from slim.distributed import Dist
from slim.errors import SlimError
from slim.export import atomic_write_text
from slim.models.convert import source_dir
from slim.ranks import rank0_first

log = logging.getLogger(__name__)

QUANTIZE_RECORD = "quantize.json"


def atomic_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, default=str) + "\n")


def run_fingerprint(cfg: SlimConfig) -> str:
    """What the exported bytes depend on: the source checkpoint, slim's version and every setting that matters.

    A finished checkpoint or an interrupted export is reused only by a run with the same fingerprint. The world
    size is not part of it: an export resumes on another number of ranks (``slim.layout``; the commit point
    records the world that saved it), and the tensors do not depend on it.
    """
    src = source_dir(cfg.model)
    config_file = src / "config.json"
    payload = {
        "slim": __version__,
        "source": str(src.resolve()),
        "source_config": hashlib.sha256(config_file.read_bytes()).hexdigest() if config_file.is_file() else None,
        "source_files": sorted((p.name, p.stat().st_size) for p in src.glob("*.safetensors")),
        "model": {k: getattr(cfg.model, k) for k in ("load_type", "dtype", "copy_mtp", "convert_from")},
        "scheme": dataclasses.asdict(cfg.scheme),
        # rtn has no settings: its fingerprint stays what it was before algorithms had any
        "algorithm": dataclasses.asdict(cfg.algorithm) if cfg.algorithm.name != "rtn" else {"name": "rtn"},
        "calibration": dataclasses.asdict(cfg.calibration),
        "max_shard_mb": cfg.export.max_shard_mb,
        "checksum": cfg.export.checksum,
        # only when set: the fingerprints (and config.json bytes) of runs that leave it alone stay as they were
        **({"moe_input_scale": cfg.export.moe_input_scale} if cfg.export.moe_input_scale != "auto" else {}),
        "device": cfg.hardware.device,
        "seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:32]


def prepare_output(cfg: SlimConfig, out_dir: Path, fingerprint: str, dist: Dist) -> bool:
    """Decide what to do with what the run dir already holds. True: its checkpoint is finished and is this run's.

    A finished checkpoint of other settings is never replaced unless ``overwrite=true``; an interrupted export
    of these settings is resumed (``export.resume``), one of other settings is refused like a finished one.
    """
    from slim.resume import ResumeStore

    def decide() -> bool:  # rank 0 alone; removing an earlier export can outlast a collective's timeout
        reusable = False
        run_dir, store = Path(cfg.run_dir), ResumeStore(out_dir, 0, fingerprint)
        record = run_dir / QUANTIZE_RECORD
        commit = store.commit_record()
        if (out_dir / "config.json").is_file():
            previous = json.loads((out_dir / "config.json").read_text()).get("slim", {}).get("fingerprint")
            if not cfg.overwrite and (previous != fingerprint or not record.is_file()):
                raise SlimError(f"{out_dir} already holds a finished checkpoint of other settings; "
                                "choose another hydra.run.dir or set overwrite=true to replace it")
            reusable = not cfg.overwrite
        elif commit and commit["fingerprint"] != fingerprint and not cfg.overwrite:
            raise SlimError(f"{run_dir} holds an interrupted export of other settings; rerun with the same settings "
                            "to resume it, or set overwrite=true to start over")
        if reusable:
            log.info("%s is already complete for these settings; skipping the quantize stage", out_dir)
        elif commit and commit["fingerprint"] == fingerprint and cfg.export.resume and not cfg.overwrite:
            log.info("resuming the interrupted export in %s", out_dir)
        else:  # nothing usable: start from scratch
            shutil.rmtree(out_dir, ignore_errors=True)
            store.clear()
            record.unlink(missing_ok=True)
        return reusable

    reusable = rank0_first(dist, Path(cfg.run_dir), "checking the run directory (and removing an earlier export)",
                           decide, cfg.hardware.rank0_wait_s)
    return bool(dist.gather(reusable)[0])


def previous_results(run_dir: Path, fingerprint: str, eval_key: str) -> dict[str, Any]:
    """Metrics of an earlier attempt of this very run (same settings), so a rerun skips finished stages."""
    path = run_dir / "results.json"
    if not path.is_file():
        return {}
    prev = json.loads(path.read_text())
    same = prev.get("fingerprint") == fingerprint and prev.get("eval_key") == eval_key
    return prev.get("metrics", {}) if same else {}


def eval_key(cfg: SlimConfig) -> str:
    """The evaluation settings' digest: an earlier attempt's scores are reused only under the same ones."""
    return hashlib.sha256(json.dumps(dataclasses.asdict(cfg.eval), sort_keys=True).encode()).hexdigest()[:16]
