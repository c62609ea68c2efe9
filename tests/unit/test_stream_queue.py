"""The streamed weight path's kernel queue (bounded by the bytes its results hold) and the pool of their outputs."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slim import kernels
from slim.export import CheckpointWriter
from slim.formats import FORMATS
from slim.hostmem import TensorPool
from slim.models.checkpoint import CheckpointReader
from slim.quant.observers import MinMaxObserver
from slim.quant.schemes import SCHEMES
from slim.quantize import STREAM_AHEAD, KernelQueue, LayerQuantizer, QuantizeResult


def linear(rows: int, cols: int = 8) -> nn.Linear:
    return nn.Linear(cols, rows, bias=False, device="meta")


def test_queue_runs_ahead_within_its_byte_budget(monkeypatch):
    monkeypatch.setattr("slim.quantize.STREAM_AHEAD_BYTES", 100)
    started, held = [], []
    queue = KernelQueue(lambda name, mod: started.append(name) or (lambda: name), lambda mod: mod.out_features)
    sizes = [30, 30, 30, 30, 90, 90, 90, 10]
    names = [f"m{i}" for i in range(len(sizes))]
    for name, rows in zip(names, sizes):
        queue.add(name, linear(rows))
        held.append(queue.held)
    assert started == names[:3]  # 3 x 30 fit in 100; a fourth would not
    assert held[-1] == 90 and len(queue) == len(sizes)
    queue.add("m0", linear(30))  # queued already: once only
    assert len(queue) == len(sizes)
    with pytest.raises(RuntimeError, match="m1 is not the next streamed Linear queued.*m0 is"):
        queue.take("m1")
    for name in names:
        assert queue.take(name)() == name  # in order; each take queues what then fits
        assert queue.held <= 100 or len(queue._queued) <= STREAM_AHEAD
        held.append(queue.held)
    assert started == names and queue.held == 0 and len(queue) == 0
    assert max(held) == 180  # two 90s: at least STREAM_AHEAD queued, whatever their size


def test_pool_hands_back_what_it_was_given_within_its_limit():
    pool = TensorPool(limit=4096)
    a = pool.empty((4, 64), torch.int32)  # 1 KiB, new
    b = pool.empty((4, 64), torch.int32)
    assert a.data_ptr() != b.data_ptr()
    pool.give(a, None, torch.empty(4, 64, dtype=torch.int32, device="meta"), a)  # None, meta and a repeat skipped
    assert pool.spare_bytes == 1024
    assert pool.empty((4, 64), torch.int32) is a
    assert pool.empty((4, 64), torch.int32) is not a  # only once
    assert pool.empty((4, 64), torch.float32) is not b  # by shape and dtype
    big = torch.empty(2048, dtype=torch.int32)  # 8 KiB: over the limit, not kept
    pool.give(b, big)
    assert pool.spare_bytes == 1024 and pool.empty((2048,), torch.int32) is not big


@pytest.mark.skipif(kernels.library() is None, reason="the streamed path needs the CPU kernels (a C compiler)")
@pytest.mark.parametrize("background", [False, True])
def test_layer_quantizer_reuses_kernel_outputs_and_writes_the_kernels_bytes(tmp_path, monkeypatch, background):
    """Twelve streamed experts with a queue of about three results: outputs come back from the pool once written
    (not with a writer thread, which writes them later), and every tensor written is the one-shot kernel's, so no
    reused buffer was written over before it went out."""
    monkeypatch.setattr("slim.quantize.STREAM_AHEAD_BYTES", 3 * (256 * 384 // 2 + 256 * 3 * 2))
    gen = torch.Generator().manual_seed(0)
    names = [f"mlp.experts.{i}.down_proj" for i in range(12)]
    stored = {}
    for name in names:
        stored[name + ".weight"] = (torch.randn(256, 384, generator=gen) * 64).clamp(-448, 448).to(torch.float8_e4m3fn)
        stored[name + ".weight_scale_inv"] = torch.rand(2, 3, generator=gen) / 100 + 1e-4
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_file(stored, src / "model.safetensors")
    reader = CheckpointReader(src, load_type="fp8")
    writer = CheckpointWriter(tmp_path / "out", direct_io=False, background=background)
    fmt, result = FORMATS["compressed-tensors"], QuantizeResult()
    lq = LayerQuantizer(SCHEMES["w4a8_dynamic"], fmt, writer, reader, 128, "minmax", result, set(names))
    handed = []
    empty = lq._pool.empty
    monkeypatch.setattr(lq._pool, "empty", lambda shape, dtype: handed.append(empty(shape, dtype)) or handed[-1])
    modules = {name: linear(256, 384).to(torch.bfloat16) for name in names}
    lq.start(modules)
    lq.quantize(modules, {name: MinMaxObserver() for name in names}, static=False)
    writer.close()

    written = load_file(next((tmp_path / "out").glob("*.safetensors")))
    for name in names:
        _, scale, _, _, bad, packed = kernels.fp8_block_int4(stored[name + ".weight"], stored[name + ".weight_scale_inv"],
                                                             (128, 128), torch.bfloat16, 128, torch.bfloat16,
                                                             pack=True, codes=False)
        assert bad == 0
        assert written[name + ".weight_packed"].equal(packed), name
        assert written[name + ".weight_scale"].equal(scale), name
    assert [m.name for m in result.modules] == names
    assert len(handed) == 2 * len(names)  # packed words and group scales of each
    # the same tensors handed out again (``handed`` keeps every one alive: without the pool all would differ)
    distinct = len({id(t) for t in handed})
    assert distinct == len(handed) if background else distinct <= 2 * 5  # at most five experts' outputs at once
