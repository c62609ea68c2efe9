"""Writer slots and the hidden-state re-split of a resume on another world size (slim.layout)."""

import pytest
import torch
from safetensors.torch import save_file

from slim.layout import WriterLayout, resplit_hidden, shards_in_slot_order


def save_ranks(tmp_path, rows: torch.Tensor, world: int, batch_size: int):
    """What ``world`` ranks save at a commit point: rank r's rows r, r+world, ... in batches."""
    files = []
    for r in range(world):
        mine = rows[r::world]
        path = tmp_path / f"rank{r:03d}-layer00003.safetensors"
        save_file({f"hidden.{i}": b.contiguous() for i, b in enumerate(mine.split(batch_size))}, str(path))
        files.append(path)
    return files


@pytest.mark.parametrize("saved,world", [(2, 1), (1, 2), (3, 2), (2, 3), (4, 4)])
def test_resplit_gives_the_batches_of_a_fresh_run_on_the_new_world(tmp_path, saved, world):
    rows = torch.arange(11 * 2 * 3, dtype=torch.float32).view(11, 2, 3)  # [N, T, H], every row different
    files = save_ranks(tmp_path, rows, saved, batch_size=2)
    for rank in range(world):
        got = resplit_hidden(files, rank, world, batch_size=3, device=torch.device("cpu"))
        want = list(rows[rank::world].split(3))
        assert [b.shape for b in got] == [b.shape for b in want]
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def test_slots_go_round_robin_to_the_ranks_of_now():
    assert [WriterLayout(4, r, 2).mine() for r in range(2)] == [[0, 2], [1, 3]]
    assert [WriterLayout(2, r, 1).mine() for r in range(1)] == [[0, 1]]
    assert [WriterLayout(1, r, 2).mine() for r in range(2)] == [[0], []]  # rank 1 calibrates only
    assert WriterLayout(1).tag(0) == "" and WriterLayout(2).tag(1) == "rank001-"
    assert [WriterLayout(3).slot_of(i) for i in range(5)] == [0, 1, 2, 0, 1]


def test_shards_are_named_in_slot_order_whoever_wrote_them():
    parts = [{0: [("a0", [], 1)], 2: [("c0", [], 1)]}, {1: [("b0", [], 1), ("b1", [], 1)]}]
    assert [s[0] for s in shards_in_slot_order(parts)] == ["a0", "b0", "b1", "c0"]
