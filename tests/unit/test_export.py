"""The streamed shard writer: what it writes is what safetensors reads back, and the manifest hashes those bytes
(small tensors inline, large ones on a helper thread while they are written)."""

import hashlib
import json

import torch
from safetensors import safe_open

from slim.export import MANIFEST, CheckpointWriter


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i in range(40):
        shape = (int(torch.randint(1, 300, (1,), generator=g)), 64)
        dtype = (torch.float32, torch.bfloat16, torch.int32, torch.float8_e4m3fn)[i % 4]
        t = torch.randn(shape, generator=g)
        out[f"model.layers.{i}.w"] = t.clamp(-448, 448).to(dtype) if dtype.is_floating_point else (t * 100).to(dtype)
    out["lm_head.weight"] = torch.randn(600, 1024, generator=g)  # 2.4 MB: hashed on the helper thread
    return out


def test_shards_read_back_bit_exact_and_manifest_hashes_the_bytes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    writer = CheckpointWriter(tmp_path / "out", max_shard_bytes=64 << 10)
    ts = tensors()
    for name, t in ts.items():
        writer.add(name, t)
        writer.maybe_flush()
    out = writer.finalize({"architectures": ["X"]}, src)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 3  # several shards
    manifest = json.loads((out / MANIFEST).read_text())["tensors"]
    for name, t in ts.items():
        with safe_open(out / index[name], framework="pt") as f:
            back = f.get_tensor(name)
        assert back.dtype == t.dtype and torch.equal(back.view(torch.uint8), t.view(torch.uint8)), name
        assert manifest[name]["sha256"] == hashlib.sha256(t.contiguous().view(torch.uint8).numpy()).hexdigest()

