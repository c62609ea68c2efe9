"""The streamed shard writer: what it writes is what safetensors reads back, and the manifest hashes those bytes
(XXH3-128 by default; sha256 with large pieces hashed on a helper thread while they are written)."""

import hashlib
import json

import pytest
import torch
import xxhash
from safetensors import safe_open

from slim import export
from slim.export import MANIFEST, CheckpointWriter


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(40):
        shape = (int(torch.randint(1, 300, (1,), generator=g)), 64)
        dtype = (torch.float32, torch.bfloat16, torch.int32, torch.float8_e4m3fn)[i % 4]
        t = torch.randn(shape, generator=g)
        out[f"model.layers.{i}.w"] = t.clamp(-448, 448).to(dtype) if dtype.is_floating_point else (t * 100).to(dtype)
    out["lm_head.weight"] = torch.randn(600, 1024, generator=g)  # 2.4 MB: sha256 hashes it on the helper thread
    return out


DIGESTS = {"xxh3_128": lambda b: xxhash.xxh3_128(b).hexdigest(), "sha256": lambda b: hashlib.sha256(b).hexdigest()}


@pytest.mark.parametrize("background,algorithm", [(False, "xxh3_128"), (True, "xxh3_128"), (False, "sha256"),
                                                  (True, "sha256")])
def test_shards_read_back_bit_exact_and_manifest_hashes_the_bytes(tmp_path, background, algorithm):
    src = tmp_path / "src"
    src.mkdir()
    kwargs = {} if algorithm == "xxh3_128" else {"algorithm": algorithm}  # xxh3_128: the default
    writer = CheckpointWriter(tmp_path / "out", max_shard_bytes=64 << 10, background=background, **kwargs)
    ts = tensors()
    for name, t in ts.items():
        writer.add(name, t)
        writer.maybe_flush()
    out = writer.finalize({"architectures": ["X"]}, src)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3  # several shards
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["algorithm"] == algorithm
    for name, t in ts.items():
        with safe_open(out / index[name], framework="pt") as f:
            back = f.get_tensor(name)
        assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8)), name
        assert manifest["tensors"][name] == {"file": index[name],
                                             algorithm: DIGESTS[algorithm](t.contiguous().view(torch.uint8).numpy())}


def test_an_unknown_checksum_algorithm_is_refused_up_front(tmp_path):
    with pytest.raises(ValueError, match="'md5' is unknown; slim knows: xxh3_128, sha256"):
        CheckpointWriter(tmp_path / "out", algorithm="md5", background=True)



def assert_same_files(a_dir, b_dir):
    """The same shard files (several), byte for byte."""
    a_files, b_files = sorted(a_dir.iterdir()), sorted(b_dir.iterdir())
    assert [p.name for p in a_files] == [p.name for p in b_files] and len(a_files) > 3
    for a, b in zip(a_files, b_files):
        assert a.read_bytes() == b.read_bytes(), a.name


def pieces_of(t: torch.Tensor, rows: int):
    """``t`` a few rows at a time through one reused buffer, as ``CheckpointReader.decoded_chunks`` hands them."""
    buf = torch.empty_like(t[:rows])
    for r in range(0, t.shape[0], rows):
        n = min(rows, t.shape[0] - r)
        yield buf[:n].copy_(t[r : r + n])


def test_background_writes_and_pieces_give_the_same_files(tmp_path, monkeypatch):
    """Queued writes (with a queue bound small enough to make the caller wait) and tensors handed over as pieces
    of a reused buffer: the same files, byte for byte, as plain synchronous writes, commit states included."""
    monkeypatch.setattr(export, "MAX_QUEUED_BYTES", 100 << 10)
    ts = tensors()
    states = {}
    for background in (False, True):
        writer = CheckpointWriter(tmp_path / str(background), max_shard_bytes=64 << 10, background=background)
        states[background] = []
        for i, (name, t) in enumerate(ts.items()):
            if i % 3 and t.dim() == 2:
                writer.add_pieces(name, t.dtype, tuple(t.shape), pieces_of(t, 7))
            else:
                writer.add(name, t)
            if i % 10 == 9:
                writer.maybe_flush()
                states[background].append(writer.state())
        writer.close()
    assert states[False] == states[True]
    assert_same_files(tmp_path / "False", tmp_path / "True")


def test_a_failed_background_write_is_raised_and_nothing_lands_after_it(tmp_path):
    def broken(t):
        yield t[:1]
        raise OSError(28, "No space left on device")

    writer = CheckpointWriter(tmp_path / "out", background=True)
    t = torch.randn(4, 8)
    writer.add("a", t)
    writer.add_pieces("b", t.dtype, tuple(t.shape), broken(t))
    writer.add("c", t)  # queued behind the failure: skipped
    with pytest.raises(OSError, match="No space left"):
        writer.state()
    assert set(writer.checksums) == {"a"}
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", t)
    writer.abandon()  # after the failure: closes the file, raises nothing


@pytest.mark.parametrize("background", [False, True])
def test_add_all_writes_what_one_add_per_tensor_writes(tmp_path, background):
    """Tensors handed over three at a time (as a quantized Linear's weight, scales and shape are): the same
    files and commit states as one ``add`` each."""
    ts = list(tensors().items())
    states = {}
    for grouped in (False, True):
        writer = CheckpointWriter(tmp_path / str(grouped), max_shard_bytes=64 << 10, background=background)
        states[grouped] = []
        for i in range(0, len(ts), 3):
            group = dict(ts[i : i + 3])
            if grouped:
                writer.add_all(group)
            else:
                for name, t in group.items():
                    writer.add(name, t)
            writer.maybe_flush()
            states[grouped].append(writer.state())
        writer.close()
    assert states[False] == states[True]
    assert_same_files(tmp_path / "False", tmp_path / "True")


def test_add_all_refuses_a_name_twice_and_stops_at_a_failed_tensor(tmp_path):
    writer = CheckpointWriter(tmp_path / "out", background=True)
    t = torch.randn(4, 8)
    writer.add("a", t)
    with pytest.raises(ValueError, match="tensor a written twice"):
        writer.add_all({"x": t, "a": t})
    assert "x" not in writer._queued  # refused as a whole: nothing of it was queued
    writer.add_all({"b": t, "bad": torch.zeros(2, dtype=torch.complex64), "c": t})  # c comes after the failure
    with pytest.raises(TypeError, match="bad: dtype torch.complex64 has no safetensors equivalent"):
        writer.state()
    assert set(writer.checksums) == {"a", "b"}
    writer.abandon()


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.7.up_proj.weight_packed", 'we"ird\\näme\t✓', ""])
@pytest.mark.parametrize("shape", [[], [2], [7168, 2048], [1, 2, 3]])
def test_header_entries_are_measured_as_json_writes_them(name, shape):
    """The shard header's room is accounted with ``_entry_json``; the header itself is ``json.dumps``'d at close."""
    entry = {"dtype": "F8_E4M3", "shape": shape, "data_offsets": [123, 1 << 62]}
    assert export._entry_json(name, entry) == json.dumps(name) + ":" + json.dumps(entry, separators=(",", ":"))


@pytest.mark.parametrize("name", ["model.layers.0.mlp.experts.7.up_proj.weight_packed", 'we"ird\\näme\t✓',
                                  "\U0001F600" * 40, "\x01" * 30])
@pytest.mark.parametrize("shape", [(), (2,), (7168, 2048), (2**62, 2**62, 3)])
def test_fits_is_the_exact_header_check_at_every_fill(tmp_path, name, shape):
    """``fits`` answers without measuring the entry while the header has room to spare (a bound on its length);
    at every fill of the reserve, from empty to full, it answers what the exact measure answers."""
    shard = export.ShardFile(tmp_path / "s.safetensors", reserve=4096, direct_io=False)
    shard.data_bytes = 10**18  # 19-digit offsets
    entry = {"dtype": "F8_E4M3", "shape": list(shape), "data_offsets": [shard.data_bytes, 1 << 62]}
    exact = len(export._entry_json(name, entry))
    for header_len in range(0, 4096, 7):
        shard._header_len = header_len
        assert shard.fits(name, shape) == (8 + header_len + exact + 1 <= 4096), header_len
    shard.abandon()
