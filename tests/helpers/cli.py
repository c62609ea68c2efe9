"""The real CLI, in a subprocess, as a user types it."""

from __future__ import annotations

import os
import subprocess
import sys


def slim_main(*args, cwd, env=None, timeout=900):
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "slim.main", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def assert_refused(proc, *fragments):
    """Exit 2 with the one-line SlimError (no traceback) naming every fragment."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in proc.stderr, proc.stderr[-2000:]


def sitecustomize_env(tmp_path, source: str) -> dict[str, str]:
    """Environment whose Python processes (every rank's too) run ``source`` at start-up, as ``sitecustomize``: how
    tests inject a fault into the real CLI."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(source)
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
