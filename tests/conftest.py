"""Shared fixtures, and the skips the ``vllm`` and ``gpu`` markers mean. Thread counts stay small: these machines
have 2 cores. Shared code lives in tests/helpers; what it imports here stays importable as ``from conftest import``."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
# bf16 conversions and cached baseline scores of this session stay out of the user's cache
os.environ.setdefault("SLIM_CACHE_DIR", tempfile.mkdtemp(prefix="slim-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers.checkpoints import add_mtp_layer, tiny_deepseek_config, write_random_deepseek  # noqa: E402,F401
from tests.helpers.configs import compose_config  # noqa: E402,F401

torch.set_num_threads(min(2, torch.get_num_threads()))


def _vllm_missing() -> str | None:
    from tests.helpers.vllm import vllm_python

    return None if vllm_python() else "set SLIM_VLLM_PYTHON to a python with vllm(-cpu)"


def _gpu_missing() -> str | None:
    return None if torch.cuda.is_available() else "needs a CUDA GPU"


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` or ``gpu`` are skipped, with the reason, where that environment is missing."""
    probes = {"vllm": _vllm_missing, "gpu": _gpu_missing}
    reasons = {}  # each probe runs once, and only when a collected test carries its marker
    for item in items:
        for name, probe in probes.items():
            if item.get_closest_marker(name) is not None:
                if name not in reasons:
                    reasons[name] = probe()
                if reasons[name]:
                    item.add_marker(pytest.mark.skip(reason=reasons[name]))


@pytest.fixture(scope="session")
def embedded_model_path():
    from slim.config import ASSETS

    return ASSETS / "tiny_deepseek"


@pytest.fixture(scope="session")
def random_deepseek(tmp_path_factory, embedded_model_path):
    return write_random_deepseek(tmp_path_factory.mktemp("rand") / "ds", embedded_model_path)


@pytest.fixture(scope="session")
def random_deepseek_dead_expert(tmp_path_factory, embedded_model_path):
    return write_random_deepseek(tmp_path_factory.mktemp("rand_dead") / "ds", embedded_model_path, dead_expert=3)
