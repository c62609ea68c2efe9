"""materialize / release: a module's tensors from the checkpoint onto the skeleton, and back to the meta device."""

import json

import torch
from safetensors.torch import save_file
from torch import nn

from slim.models.checkpoint import CheckpointReader
from slim.models.materialize import materialize, release


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 4, bias=True)
        self.norm = nn.LayerNorm(8)
        self.register_buffer("scale", torch.ones(4))
        self.register_buffer("cache", torch.zeros(2), persistent=False)  # never in a checkpoint


def skeleton() -> Block:
    with torch.device("meta"):
        return Block()


def checkpoint(tmp_path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {f"blk.{k}": torch.randn(v.shape) for k, v in Block().state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({}))
    return tensors


def test_materialize_fills_every_persistent_tensor_but_the_skipped(tmp_path):
    tensors = checkpoint(tmp_path)
    block = skeleton()
    materialize(block, "blk.", CheckpointReader(tmp_path), skip=frozenset({"blk.proj.weight"}))
    assert block.proj.weight.is_meta  # skipped: left in the checkpoint
    for name in ("proj.bias", "norm.weight", "norm.bias", "scale"):
        got = block.get_parameter(name) if name != "scale" else block.scale
        assert torch.equal(got, tensors["blk." + name]), name
    assert not block.proj.bias.requires_grad
    assert block.cache.is_meta  # non-persistent: not read


def test_release_is_to_meta(tmp_path):
    """``release`` leaves what ``module.to("meta")`` leaves (every parameter and buffer on meta, names, shapes,
    dtypes and requires_grad kept) and drops the references to the real tensors, so their memory goes."""
    checkpoint(tmp_path)
    block, reference = skeleton(), skeleton()
    for b in (block, reference):
        materialize(b, "blk.", CheckpointReader(tmp_path), skip=frozenset({"blk.proj.weight"}))
        b.cache = torch.full((2,), 3.0)  # a real non-persistent buffer goes too
    real = block.proj.bias
    release(block)
    reference.to("meta")
    assert not real.is_meta  # the old tensor is untouched, only no longer the module's
    got = {n: t for n, t in [*block.named_parameters(), *block.named_buffers()]}
    want = {n: t for n, t in [*reference.named_parameters(), *reference.named_buffers()]}
    assert got.keys() == want.keys()
    for name, t in got.items():
        assert t.is_meta and t.shape == want[name].shape and t.dtype == want[name].dtype, name
        assert isinstance(t, nn.Parameter) == isinstance(want[name], nn.Parameter), name
        assert t.requires_grad == want[name].requires_grad, name
