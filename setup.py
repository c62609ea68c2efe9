"""Build hook only (metadata lives in pyproject.toml): the wheel ships the top-level ``conf/`` as ``slim/conf``.

The repository keeps Hydra's config tree beside the package; an installed wheel has nothing outside ``slim/``,
so ``build_py`` copies ``conf/**/*.yaml`` into the built package, where ``slim.paths.conf_dir`` finds it.
An sdist carries ``conf/`` at its top level (MANIFEST.in) and builds the same wheel. Editable installs skip the
copy and read the checkout's ``conf/``.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

CONF = Path(__file__).resolve().parent / "conf"


class BuildPyWithConf(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        if not (CONF / "config.yaml").is_file():
            raise FileNotFoundError(f"{CONF}/config.yaml is missing: the wheel would have no configs")
        for src in sorted(CONF.rglob("*.yaml")):
            dst = Path(self.build_lib) / "slim" / "conf" / src.relative_to(CONF)
            self.mkpath(str(dst.parent))
            self.copy_file(str(src), str(dst))


setup(cmdclass={"build_py": BuildPyWithConf})
