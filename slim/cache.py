"""slim's cache directory: ``$SLIM_CACHE_DIR``, else ``~/.cache/slim`` (baseline scores, built CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("SLIM_CACHE_DIR") or Path.home() / ".cache" / "slim")
