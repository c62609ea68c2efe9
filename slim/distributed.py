"""Data parallel calibration across ranks (torchrun): nccl on GPUs, gloo on CPUs.

Every rank streams the same decoder layer and runs its own slice of the calibration samples. Observer
statistics are merged with ``all_reduce(MAX)`` on fp32 amax values (FP8 tensors cannot be reduced) and
``SUM`` on token counts; MAX is order-independent, so every rank ends with exactly the scales a single
process computes. Quantized tensors are then written by their owner rank only (disjoint shards); rank 0
writes the index and config last.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from slim.config import HardwareConfig
from slim.errors import SlimError
from slim.quant.observers import MinMaxObserver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world == 1`` makes every collective a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    diag_group: Any = None  # a gloo group used only to name unresponsive ranks after a failure

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Round-robin ownership of the ``index``-th item of a list every rank sees in the same order."""
        return index % self.world == self.rank

    def shard(self, samples: torch.Tensor) -> torch.Tensor:
        """This rank's calibration samples: every ``world``-th row starting at ``rank``."""
        return samples[self.rank :: self.world]

    def reduce_observers(self, observers: dict[str, MinMaxObserver]) -> None:
        """Merge observers across ranks in place: amax by MAX (fp32), tokens by SUM, NaN flags by MAX, integer
        ``counts()`` by SUM, and other ``state()`` by the observer's ``merge`` over every rank's state in rank
        order."""
        if self.world == 1 or not observers:
            return
        names = sorted(observers)
        amax = torch.stack([observers[n].amax.float() for n in names]).to(self.device)  # [M]
        flags = torch.tensor([float(observers[n].nonfinite) for n in names], device=self.device)
        tokens = torch.tensor([observers[n].tokens for n in names], dtype=torch.int64, device=self.device)
        self._collective(dist.all_reduce, amax, op=dist.ReduceOp.MAX)
        self._collective(dist.all_reduce, flags, op=dist.ReduceOp.MAX)
        self._collective(dist.all_reduce, tokens, op=dist.ReduceOp.SUM)
        for i, n in enumerate(names):
            observers[n].amax = amax[i].cpu()
            observers[n].nonfinite = bool(flags[i].item())
            observers[n].tokens = int(tokens[i].item())
        # integer statistics (percentile histograms): summed exactly by one all_reduce, in place
        counts = [(n, c) for n in names if (c := observers[n].counts()) is not None]
        if counts:
            flat = torch.cat([c for _, c in counts]).to(self.device)  # [sum K] int64
            self._collective(dist.all_reduce, flat, op=dist.ReduceOp.SUM)
            for (_, c), part in zip(counts, flat.cpu().split([c.numel() for _, c in counts])):
                c.copy_(part)
        # other statistics (mse row samples): every rank's state, in rank order
        states = {n: observers[n].state() for n in names}
        if any(s is not None for s in states.values()):
            gathered = self.gather({n: s for n, s in states.items() if s is not None})
            for n in names:
                if states[n] is not None or any(n in g for g in gathered):
                    observers[n].merge([g.get(n) for g in gathered])

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (on every rank)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        self._collective(dist.all_gather_object, out, obj)
        return out

    def broadcast(self, obj: Any = None) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass nothing)."""
        if self.world == 1:
            return obj
        box = [obj if self.is_main else None]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def sum_in_rank_order(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape and dtype on each) added up in rank order: the same bits on every
        rank and in every run (an all_reduce's summation order is the backend's)."""
        if self.world == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        self._collective(dist.all_gather, parts, tensor.contiguous())
        total = parts[0]
        for p in parts[1:]:
            total += p
        return total

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(dist.barrier)

    def _collective(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:  # gloo/nccl raise RuntimeError on timeouts and dead peers
            raise SlimError(
                f"rank {self.rank}: {fn.__name__} failed ({str(exc).splitlines()[0]}); {self._unresponsive()}"
            ) from exc

    def _unresponsive(self) -> str:
        """Name the ranks that do not answer a monitored barrier (gloo) after a collective failed."""
        if self.diag_group is None:
            return "another rank died or hangs"
        try:
            dist.monitored_barrier(group=self.diag_group, timeout=datetime.timedelta(seconds=10), wait_all_ranks=True)
        except RuntimeError as exc:
            return f"unresponsive: {str(exc).splitlines()[0]}"
        return "all ranks answer a barrier: a rank failed inside the collective"


def init_distributed(hw: HardwareConfig) -> Dist:
    """Join the torchrun job described by the environment; a single process gets ``Dist()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(hw.device)
    if world == 1:
        return Dist(device=device)
    expected = hw.nodes * hw.procs_per_node
    if world != expected:
        raise SlimError(f"torchrun started {world} ranks but hardware={hw.name} describes {expected}; "
                        f"set hardware.nodes/procs_per_node to match --nnodes x --nproc-per-node")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if hw.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    timeout = datetime.timedelta(seconds=hw.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(hw.backend, timeout=timeout)
    diag = dist.new_group(backend="gloo", timeout=timeout)
    log.info("rank %d/%d (local %d) on %s, backend %s", rank, world, local_rank, device, hw.backend)
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device, diag_group=diag)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
