"""slim.collector: the garbage collector paused while a skeleton is built, long-lived objects frozen in the loop."""

import gc
import weakref

import pytest
import torch

from slim import collector


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture(autouse=True)
def _collector_restored():
    enabled = gc.isenabled()
    yield
    gc.unfreeze()
    (gc.enable if enabled else gc.disable)()


def test_paused_disables_and_restores_even_after_an_error():
    gc.enable()
    with collector.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector.paused():
        raise RuntimeError("boom")
    assert gc.isenabled()


def test_paused_keeps_a_disabled_collector_disabled():
    gc.disable()
    with collector.paused():
        assert not gc.isenabled()
    assert not gc.isenabled()


def test_long_lived_frozen_collects_existing_garbage_then_freezes_the_rest():
    dead = Node()
    dead_ref = weakref.ref(dead)
    del dead  # garbage on entry: collected, not frozen
    alive = Node()
    with collector.long_lived_frozen():
        assert dead_ref() is None
        assert gc.get_freeze_count() > 0
        assert not any(o is alive for o in gc.get_objects())  # out of the collector's generations
        fresh = Node()
        assert any(o is fresh for o in gc.get_objects())  # what the block allocates is still collected
    assert gc.get_freeze_count() == 0
    assert any(o is alive for o in gc.get_objects())


def test_long_lived_frozen_unfreezes_after_an_error():
    with pytest.raises(ValueError), collector.long_lived_frozen():
        raise ValueError("boom")
    assert gc.get_freeze_count() == 0


def test_building_a_skeleton_leaves_the_collector_on(embedded_model_path):
    from slim.models.adapters import build_skeleton, load_config

    gc.enable()
    model, _ = build_skeleton(load_config(str(embedded_model_path), False), torch.bfloat16)
    assert gc.isenabled()
    experts = [m for n, m in model.named_modules() if n.endswith("experts.0.gate_proj")]
    assert experts and experts[0].weight.is_meta  # built without values (no_init_weights: nothing to initialize)
