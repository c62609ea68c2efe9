"""AWQ across ranks: the activation sums and search errors are merged in rank order, so every rank picks the same
scales and two gloo ranks write what one process writes (through the real CLI, hardware=cpu_x2 vs cpu)."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.distributed.test_gloo import slim_main, tensors


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _merge_worker(rank, world, port, out):
    from slim.algorithms.awq import merge_sums
    from slim.distributed import Dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        parts = [torch.rand(5, dtype=torch.float64) * 10 ** (rank * 8),
                 torch.tensor([float(rank + 1)], dtype=torch.float64)]
        merged = merge_sums(Dist(rank=rank, world=world), parts)
        out[rank] = ([p.clone() for p in parts], [m.clone() for m in merged])
    finally:
        dist.destroy_process_group()


def test_merge_sums_adds_in_rank_order_on_every_rank():
    """Values of very different magnitude, so the order of the additions shows in the bits."""
    world = 3
    out = mp.Manager().dict()
    mp.spawn(_merge_worker, args=(world, _free_port(), out), nprocs=world, join=True)
    parts = [out[r][0] for r in range(world)]
    expected = [parts[0][i].clone() + parts[1][i] + parts[2][i] for i in range(2)]
    for r in range(world):
        assert all(torch.equal(m, e) for m, e in zip(out[r][1], expected)), r


@pytest.mark.slow
def test_awq_two_ranks_write_what_one_writes(tmp_path):
    common = ["scheme=w4a8", "algorithm=awq", "eval=none", "logger=none", "calibration.num_samples=8",
              "calibration.seq_len=128", "algorithm.search_samples=4", "algorithm.grid=6"]
    runs = {}
    for hw in ("cpu", "cpu_x2"):
        proc = slim_main(f"hardware={hw}", *common, f"hydra.run.dir={tmp_path / hw}", cwd=tmp_path, timeout=1800)
        assert proc.returncode == 0, proc.stderr[-4000:]
        runs[hw] = tensors(tmp_path / hw / "checkpoint")
    one, two = runs["cpu"], runs["cpu_x2"]
    assert one.keys() == two.keys()
    different = [n for n in one if not (one[n].dtype == two[n].dtype and torch.equal(one[n], two[n]))]
    assert not different, different
