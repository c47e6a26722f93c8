"""Build hook: generate the gRPC stubs into client/_pb before packaging.

Everything else lives in pyproject.toml. The stubs are generated, not committed, so every build
(wheel, sdist install, `make proto`) runs the same generator: tools/genproto.py.
"""
import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildWithStubs(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("genproto", ROOT / "tools" / "genproto.py")
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.generate(ROOT)
        super().run()


setup(cmdclass={"build_py": BuildWithStubs})
