"""Where the streamed backend keeps the requests' hidden states between layers (slim.hidden_store)."""

import torch

from slim.hidden_store import HiddenStore, choose_store

GiB = 2**30


def test_choose_store_prefers_the_device_then_host_then_disk():
    gpu, cpu = torch.device("cuda"), torch.device("cpu")
    assert choose_store("auto", 10 * GiB, gpu, 80 * GiB, 100 * GiB) == "device"
    assert choose_store("auto", 50 * GiB, gpu, 80 * GiB, 200 * GiB) == "host"  # more than half the GPU
    assert choose_store("auto", 50 * GiB, gpu, 80 * GiB, 60 * GiB) == "disk"  # more than half the host too
    assert choose_store("auto", 1 * GiB, cpu, 0, 8 * GiB) == "host"
    assert choose_store("auto", 5 * GiB, cpu, 0, 8 * GiB) == "disk"
    assert choose_store("device", 5 * GiB, cpu, 0, 8 * GiB) == "host"  # a CPU run has no device memory
    assert choose_store("disk", 1, gpu, 80 * GiB, 100 * GiB) == "disk"


def test_disk_store_round_trips_and_removes_its_file(tmp_path):
    shapes = [(2, 5, 8), (1, 3, 8)]
    store = HiddenStore(shapes, torch.bfloat16, "disk", torch.device("cpu"), tmp_path)
    tensors = [torch.randn(s).to(torch.bfloat16) for s in shapes]
    for i, t in enumerate(tensors):
        store.put(i, t)
    assert store.path.stat().st_size == sum(t.numel() for t in tensors) * 2
    for i, t in enumerate(tensors):
        got = store.get(i)
        assert torch.equal(got, t)
        got.add_(1)  # a copy: changing it leaves the slot as written
        assert torch.equal(store.get(i), t)
    store.put(0, tensors[0] * 2)  # a layer's output replaces its input in place
    assert torch.equal(store.get(0), tensors[0] * 2)
    store.close()
    assert not list(tmp_path.iterdir())


def test_host_store_keeps_one_tensor_per_slot():
    store = HiddenStore([(1, 2, 4)], torch.float32, "host", torch.device("cpu"))
    t = torch.randn(1, 2, 4)
    store.put(0, t)
    assert store.get(0) is t and store.nbytes() == t.numel() * 4
