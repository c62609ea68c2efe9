"""What every rank of a job needs beyond the collectives: a log that names its rank, and waiting for rank 0's work.

**Logs.** Under torchrun (``WORLD_SIZE`` > 1) every line a rank logs starts with ``[rank r/W]`` (every line of a
multi-line record too), on the console and in its file, and each rank has its own log file in the run dir: rank 0
keeps Hydra's ``main.log``, rank ``k`` writes ``main.rank<k>.log``. A single process logs as before (no prefix).

**Rank-0 work before a barrier** (``rank0_first``): converting an FP8 source to bf16 takes hours at DeepSeek-R1's
size, far longer than a collective's timeout (``hardware.timeout_s``), so the other ranks do not wait in a
collective. Rank 0 writes a status file in the run dir when its work ends (``ok``, or the error's one line); the
others poll for it (``hardware.rank0_wait_s``, default a day) and raise rank 0's error as their own as soon as it
is there, instead of hanging until a collective times out (rank 0 lets them report it before it exits and
torchrun stops the job). A rank killed outright is torchrun's to report: it
stops the other ranks.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from slim.errors import SlimError

log = logging.getLogger(__name__)
T = TypeVar("T")
WAIT_DIR = ".slim_rank0"
POLL_S = 0.5
ACK_WAIT_S = 10.0  # rank 0 failed: how long it waits for the others to have reported its error


def torchrun_rank() -> tuple[int, int] | None:
    """(rank, world) of a torchrun worker of a multi-rank job; None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return (int(os.environ.get("RANK", "0")), world) if world > 1 and "RANK" in os.environ else None


class RankFormatter(logging.Formatter):
    """Another formatter's lines, each prefixed with ``[rank r/W] ``."""

    def __init__(self, inner: logging.Formatter | None, rank: int, world: int):
        super().__init__()
        self.inner, self.prefix = inner or logging.Formatter(), f"[rank {rank}/{world}] "

    def format(self, record: logging.LogRecord) -> str:
        return "\n".join(self.prefix + line for line in self.inner.format(record).split("\n"))


def rank_log_file(path: Path, rank: int) -> Path:
    """``main.log`` -> ``main.rank<k>.log`` for rank k > 0 (rank 0 keeps Hydra's file)."""
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def install_rank_logging() -> None:
    """Prefix every handler of the root logger with this rank and give ranks > 0 their own log file (replacing
    the file handler Hydra opened on ``main.log``); nothing for a single process. Idempotent."""
    where = torchrun_rank()
    if where is None:
        return
    rank, world = where
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler.formatter, RankFormatter):
            continue
        if isinstance(handler, logging.FileHandler) and rank > 0:
            own = logging.FileHandler(rank_log_file(Path(handler.baseFilename), rank), mode="a")
            own.setLevel(handler.level)
            own.setFormatter(handler.formatter)
            root.removeHandler(handler)
            handler.close()
            handler = own
            root.addHandler(own)
        handler.setFormatter(RankFormatter(handler.formatter, rank, world))


def rank0_first(dist, run_dir: Path, what: str, work: Callable[[], T], wait_s: float) -> T | None:
    """Run ``work`` on rank 0 while the other ranks wait for it without a collective timeout (see module
    docstring); every rank leaves together. Returns ``work``'s result on rank 0, None elsewhere."""
    if dist.world == 1:
        return work()
    token = dist.gather(uuid.uuid4().hex if dist.is_main else None)[0]  # this job's own status file
    status = Path(run_dir) / WAIT_DIR / f"{token}.json"
    if dist.is_main:
        status.parent.mkdir(parents=True, exist_ok=True)
        try:
            result = work()
        except BaseException as exc:
            line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            _write_status(status, {"ok": False, "error": f"{type(exc).__name__}: {line}"})
            _await_acks(status, dist.world)  # before this rank exits and torchrun stops the others
            _remove(status)
            raise
        _write_status(status, {"ok": True})
    else:
        result = None
        _wait_for(status, what, wait_s)
    dist.barrier()  # every rank is here: the status file has been read
    if dist.is_main:
        _remove(status)
    return result


def _remove(status: Path) -> None:
    for path in (status, *status.parent.glob(f"{status.stem}.ack*")):
        path.unlink(missing_ok=True)
    try:
        status.parent.rmdir()
    except OSError:
        pass  # another job's status files are still there


def _write_status(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def _wait_for(status: Path, what: str, wait_s: float) -> None:
    start, logged = time.monotonic(), 0.0
    log.info("waiting for rank 0: %s (up to %d s, hardware.rank0_wait_s)", what, wait_s)
    while not status.is_file():
        waited = time.monotonic() - start
        if waited > wait_s:
            raise SlimError(f"rank 0 did not finish {what} within hardware.rank0_wait_s={wait_s:g} s; raise it, "
                            "or run that step once beforehand")
        if waited - logged >= 600:
            logged = waited
            log.info("still waiting for rank 0: %s (%.0f s)", what, waited)
        time.sleep(POLL_S)
    state = json.loads(status.read_text())
    if not state["ok"]:
        err = SlimError(f"rank 0 failed while {what}: {state['error']}")
        log.error("%s", err)  # logged before the acknowledgement lets rank 0 exit (torchrun then stops this rank)
        status.with_name(f"{status.stem}.ack{os.environ.get('RANK', '')}").touch()
        raise err


def _await_acks(status: Path, world: int, wait_s: float = ACK_WAIT_S) -> None:
    """Rank 0, after writing a failure: give the other ranks up to ``wait_s`` to read and report it."""
    deadline = time.monotonic() + wait_s
    while len(list(status.parent.glob(f"{status.stem}.ack*"))) < world - 1 and time.monotonic() < deadline:
        time.sleep(POLL_S / 5)
