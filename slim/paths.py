"""Where Hydra's config tree is. The repository keeps it at the top level (``conf/``); a built wheel ships the
same files inside the package as ``slim/conf`` (``setup.py``'s build hook), since nothing outside the package
is installed. A source checkout or an editable install reads the top-level copy."""

from __future__ import annotations

from pathlib import Path

from slim.errors import SlimError

PACKAGE = Path(__file__).resolve().parent


def conf_dir() -> Path:
    """The directory holding ``config.yaml``: the packaged copy if installed from a wheel, else the checkout's."""
    # The packaged copy first: an installed wheel's parent is site-packages, where another project may own `conf/`.
    for candidate in (PACKAGE / "conf", PACKAGE.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise SlimError(f"slim's configs are missing: neither {PACKAGE / 'conf'} nor {PACKAGE.parent / 'conf'} has "
                    "config.yaml; reinstall slim from a wheel or sdist (pip install .), or run from a checkout")
