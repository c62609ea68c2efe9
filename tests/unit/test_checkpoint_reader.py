"""slim.models.checkpoint: tensors read as views of a memory map are safetensors' tensors, and bad files are refused."""

from __future__ import annotations

import gc
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from slim.errors import SlimError
from slim.models.checkpoint import SAFETENSORS_DTYPES, CheckpointReader, Shard


def every_dtype() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(5, 7)
    out = {f"t.{str(d).split('.')[-1]}": (x * 10).to(d) for d in SAFETENSORS_DTYPES.values() if d != torch.bool}
    out.update({"t.bool": x > 0, "t.scalar": torch.tensor(3.5), "t.empty": torch.zeros(0, 4),
                "t.u16": torch.arange(6, dtype=torch.int32).to(torch.uint16), "t.odd": torch.randn(3, dtype=torch.float64)})
    return out


def test_views_are_safetensors_tensors_for_every_dtype(tmp_path):
    tensors = every_dtype()
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        for name, want in tensors.items():
            got = reader.raw(name)
            assert got.dtype == want.dtype and got.shape == want.shape, name
            assert torch.equal(got.view(-1).view(torch.uint8), f.get_tensor(name).view(-1).view(torch.uint8)), name
    shard = reader._shards["model.safetensors"]
    assert "t.empty" not in shard.entries and "t.u16" not in shard.entries  # read through safetensors
    view = reader.raw("t.float32")
    reader.close()
    gc.collect()
    assert torch.equal(view, tensors["t.float32"])  # a view outlives the reader's map
    view.add_(1)  # copy-on-write: the file is never written
    assert torch.equal(reader.raw("t.float32"), tensors["t.float32"])


def test_a_tensor_whose_offsets_leave_the_file_is_refused(tmp_path):
    save_file({"a": torch.ones(4, 4), "b": torch.ones(2)}, tmp_path / "model.safetensors")
    path = tmp_path / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["b"]["shape"] = [3]  # 12 bytes claimed over 8 stored
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    path.write_bytes(raw[:8] + text + raw[8 + n :])
    with pytest.raises(SlimError, match="corrupt"):
        Shard(path)
    path.write_bytes(raw[: 8 + n + 10])  # truncated: safetensors' own check
    with pytest.raises(SlimError, match="truncated or corrupt"):
        Shard(path)


def test_at_most_max_open_shards_stay_mapped(tmp_path):
    for i in range(6):
        save_file({f"w{i}": torch.full((3,), float(i))}, tmp_path / f"s{i}.safetensors")
    (tmp_path / "config.json").write_text("{}")
    reader = CheckpointReader(tmp_path)
    got = [reader.raw(f"w{i}") for i in range(6)]
    assert [float(t[0]) for t in got] == [float(i) for i in range(6)]
    mapped = [s for s in reader._shards.values() if s._map is not None]
    assert len(mapped) == CheckpointReader.MAX_OPEN == len(reader._open)
    reader.close()
    assert not reader._open and all(s._map is None for s in reader._shards.values())


def fp8_checkpoint(tmp_path, rows: int, cols: int, nan_at: tuple[int, int] | None = None) -> CheckpointReader:
    from slim.quant.fp8 import quantize_fp8_block

    torch.manual_seed(3)
    q, s = quantize_fp8_block(torch.randn(rows, cols) * 0.02)
    if nan_at is not None:
        q.view(torch.uint8)[nan_at] = 0x7F
    save_file({"w.weight": q, "w.weight_scale_inv": s}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text("{}")
    return CheckpointReader(tmp_path, load_type="fp8")


@pytest.mark.parametrize("kernels_on", [True, False])
def test_decoded_chunks_are_the_whole_decode_a_block_of_rows_at_a_time(tmp_path, monkeypatch, kernels_on):
    """Pieces of whole 128-row blocks (decoded by the kernels, or by torch), in one reused buffer: together they
    are ``get``'s tensor, and nothing else is held."""
    from slim import kernels

    if not kernels_on:
        monkeypatch.setattr(kernels, "_enabled", False)
    reader = fp8_checkpoint(tmp_path, 700, 256)
    pieces = [p.clone() for p in reader.decoded_chunks("w.weight", torch.bfloat16, max_bytes=128 * 256 * 2 * 2)]
    assert [p.shape[0] for p in pieces] == [256, 256, 188]
    assert torch.equal(torch.cat(pieces), reader.get("w.weight", torch.bfloat16))
    ptrs = {p.data_ptr() for p in reader.decoded_chunks("w.weight", torch.bfloat16, max_bytes=128 * 256 * 2 * 2)}
    assert len(ptrs) == 1


def test_decoded_chunks_refuse_nan_after_the_last_block_and_may_be_dropped_midway(tmp_path):
    reader = fp8_checkpoint(tmp_path, 700, 256, nan_at=(650, 3))
    with pytest.raises(SlimError, match="1 NaN/Inf"):
        for _ in reader.decoded_chunks("w.weight", torch.bfloat16, max_bytes=128 * 256 * 2):
            pass
    chunks = reader.decoded_chunks("w.weight", torch.bfloat16, max_bytes=128 * 256 * 2)
    first = next(chunks).clone()
    chunks.close()  # dropped midway (a failed write): no error for the NaN it never reached
    assert torch.equal(first, reader.get("w.weight", torch.bfloat16)[:128])


def test_decoded_chunks_keep_the_readers_buffer_and_interleaved_ones_get_their_own(tmp_path):
    """The buffer outlives a tensor (the next one reuses its pages), is free again once a generator is exhausted or
    closed, and a generator started while another holds it decodes into a buffer of its own: the same bytes."""
    reader = fp8_checkpoint(tmp_path, 700, 256)
    want = reader.get("w.weight", torch.bfloat16)
    kw = dict(max_bytes=128 * 256 * 2)
    first = {p.data_ptr() for p in reader.decoded_chunks("w.weight", torch.bfloat16, **kw)}
    again = {p.data_ptr() for p in reader.decoded_chunks("w.weight", torch.bfloat16, **kw)}
    assert len(first) == 1 and first == again
    a, b = (reader.decoded_chunks("w.weight", torch.bfloat16, **kw) for _ in range(2))
    pieces_a, pieces_b = [], []
    for pa, pb in zip(a, b):  # interleaved: each block consumed before its generator's next
        assert pa.data_ptr() != pb.data_ptr()
        pieces_a.append(pa.clone())
        pieces_b.append(pb.clone())
    assert torch.equal(torch.cat(pieces_a), want) and torch.equal(torch.cat(pieces_b), want)
    dropped = reader.decoded_chunks("w.weight", torch.bfloat16, **kw)
    next(dropped)
    dropped.close()
    assert {p.data_ptr() for p in reader.decoded_chunks("w.weight", torch.bfloat16, **kw)} == first
