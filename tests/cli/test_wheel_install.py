"""slim as a user installs it: sdist -> wheel -> a fresh virtual environment -> ``python -m slim.main``.

The repository keeps ``conf/`` beside the package; the wheel must carry it (as ``slim/conf``, setup.py) or an
installed slim cannot compose a single run. Offline: the build uses this environment's setuptools
(``--no-build-isolation``) and the fresh environment sees this one's dependencies through a ``.pth`` line, which
adds the directory to ``sys.path`` without running the ``.pth`` files inside it (so an editable slim installed
there stays invisible).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "slim", "conf")  # what an sdist is built from
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info", "conf")  # slim/conf: a stale build


def run(cmd, cwd, timeout=300, **env):
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env={**clean, **env}, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv with slim from a wheel built from an sdist of this checkout: (its python, its site-packages)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # a copy: building in place would leave build/ and slim.egg-info/ in the checkout
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=IGNORE if name == "slim" else None)
        else:
            shutil.copy2(REPO / name, src / name)
    code = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    sdist = tmp / "dist" / run([sys.executable, "-c", code, tmp / "dist"], cwd=src).stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        assert "slim-0.1.0/conf/config.yaml" in tar.getnames()
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--no-cache-dir",
         "-w", tmp / "wheels", sdist], cwd=tmp)
    (wheel,) = (tmp / "wheels").glob("slim-*.whl")

    venv = tmp / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    python = venv / "bin" / "python"
    # pip runs inside the fresh interpreter before the dependencies are visible: it sees no other slim to replace
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--no-cache-dir",
         wheel], cwd=tmp)
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run([python, "-c", purelib], cwd=tmp).stdout.strip())
    shipped, repo = site / "slim" / "conf", REPO / "conf"
    assert sorted(f.relative_to(shipped) for f in shipped.rglob("*.yaml")) == sorted(
        f.relative_to(repo) for f in repo.rglob("*.yaml"))  # every group and preset, Hydra's own groups included
    (site / "_slim_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, site


def test_installed_wheel_quantizes_with_its_packaged_configs(installed, tmp_path):
    python, site = installed
    cwd = tmp_path / "elsewhere"  # neither the checkout nor its conf/ on any path
    cwd.mkdir()
    where = run([python, "-c", "import slim, slim.paths; print(slim.__file__); print(slim.paths.conf_dir())"], cwd=cwd)
    module, conf = map(Path, where.stdout.split())
    assert module == site / "slim" / "__init__.py" and conf == site / "slim" / "conf"

    run_dir = tmp_path / "run"
    run([python, "-m", "slim.main", "logger=none", "eval=none", "calibration.num_samples=8",
         f"hydra.run.dir={run_dir}"], cwd=cwd, OMP_NUM_THREADS="2", WANDB_SILENT="true")
    sources = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    assert [s.path for s in sources if s.provider == "main"] == [str(site / "slim" / "conf")]
    ckpt = run_dir / "checkpoint"
    config = json.loads((ckpt / "config.json").read_text())
    assert config["quantization_config"]["format"] == "float-quantized"
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert all((ckpt / shard).is_file() for shard in set(index.values()))
