"""The streamed evaluation over N ranks: rank 0 runs lm-eval and hands each pass's batches out, every rank
scores its share, rank 0 puts the answers back in order.

Messages go from rank 0 to all ranks by broadcast, answers come back by gather, both through
:class:`slim.distributed.Dist`:

    ("open", request)     score the checkpoint ``request`` names until "close" (``open_worker(request)`` builds
                          the worker's scorer: ``jobs -> answers``)
    ("score", jobs, owners)   every rank scores the jobs ``owners`` gives it; rank 0 gathers the answers
    ("close",)            the checkpoint is done
    ("done",)             no more evaluation: the other ranks leave :func:`serve`

A batch is scored whole by one rank, exactly as a single process scores it, so the scores do not depend on the
number of ranks. Batches go to ranks by :func:`assign` (largest first, each to the least-loaded rank), so each
rank holds about ``1/N`` of the requests' hidden states.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from slim.distributed import Dist
from slim.errors import SlimError

log = logging.getLogger(__name__)
Scorer = Callable[[list], list]  # jobs -> one answer per job, in order


def assign(costs: list[int], world: int) -> list[int]:
    """The rank that scores each job: the costliest first, each to the rank with the least cost so far (the
    lowest rank on ties). Deterministic: every rank computes the same list from the same costs."""
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


class RankScorer:
    """Rank 0's side: ``scorer(jobs)`` scores them over all ranks (``local`` scores this rank's share)."""

    def __init__(self, dist: Dist, local: Scorer, cost: Callable[[Any], int]):
        self.dist, self.local, self.cost = dist, local, cost

    def __call__(self, jobs: list) -> list:
        owners = assign([self.cost(j) for j in jobs], self.dist.world)
        self.dist.broadcast(("score", jobs, owners))
        mine = [i for i, r in enumerate(owners) if r == 0]
        failed: BaseException | None = None
        try:
            reply = ("ok", self.local([jobs[i] for i in mine]))
        except Exception as exc:  # still gather, so the other ranks are not left waiting
            failed, reply = exc, ("error", _describe(exc))
        replies = self.dist.gather(reply)
        if failed is not None:
            raise failed
        answers: list = [None] * len(jobs)
        for rank, (status, part) in enumerate(replies):
            if status != "ok":
                raise SlimError(f"streamed evaluation failed on rank {rank}: {part}")
            for i, answer in zip([i for i, r in enumerate(owners) if r == rank], part, strict=True):
                answers[i] = answer
        return answers


@contextlib.contextmanager
def checkpoint_open(dist: Dist, request: dict) -> Iterator[None]:
    """Rank 0: the other ranks score ``request``'s checkpoint with it for the duration of the block."""
    if dist.world == 1:
        yield
        return
    dist.broadcast(("open", request))
    try:
        yield
    finally:
        dist.broadcast(("close",))


@contextlib.contextmanager
def serving_ranks(dist: Dist, active: bool) -> Iterator[None]:
    """Rank 0: wraps everything rank 0 does while the other ranks :func:`serve`; they leave when it ends, however
    it ends (an error on rank 0 does not leave them waiting for the collective timeout)."""
    try:
        yield
    finally:
        if active and dist.world > 1:
            dist.broadcast(("done",))


def serve(dist: Dist, open_worker: Callable[[dict], Scorer]) -> None:
    """The other ranks: score what rank 0 hands out until it says done. An error is sent to rank 0 (which fails
    the job naming this rank) and raised here once rank 0 is done."""
    scorer: Scorer | None = None
    failed: BaseException | None = None
    while True:
        msg = dist.broadcast()
        kind = msg[0]
        if kind == "open":
            try:
                scorer = open_worker(msg[1])
            except Exception as exc:  # reported at the next "score", which rank 0 gathers
                scorer, failed = None, exc
        elif kind == "score":
            jobs, owners = msg[1], msg[2]
            try:
                if scorer is None:
                    raise failed or SlimError("no checkpoint open")
                reply = ("ok", scorer([j for j, r in zip(jobs, owners) if r == dist.rank]))
            except Exception as exc:
                failed, reply = exc, ("error", _describe(exc))
            dist.gather(reply)
        elif kind == "close":
            scorer = None
        elif kind == "done":
            if failed is not None:
                raise failed
            return
        else:
            raise SlimError(f"rank {dist.rank}: unknown evaluation message {kind!r} from rank 0")


def _describe(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, SlimError) else f"{type(exc).__name__}: {exc}"
