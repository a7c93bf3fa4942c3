"""Build hook only (the metadata lives in pyproject.toml): generate the gRPC code from protos/
into services/_generated before the Python files are collected, for `pip install .`,
`pip install -e .` and wheel builds alike."""

import importlib.util
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _codegen():
    # Loaded by path: the project is not importable while it is being built.
    spec = importlib.util.spec_from_file_location("_avatar_forcing_codegen", ROOT / "services/wire/codegen.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


class BuildPyWithProtos(build_py):
    def run(self):
        codegen = _codegen()
        if codegen.proto_files():
            codegen.generate()
        elif not any((codegen.OUT_ROOT / codegen.PROTO_PACKAGE).glob("*_pb2.py")):
            raise RuntimeError(
                f"setup.py: neither {codegen.PROTO_ROOT} nor generated code; the sdist must include protos/"
            )
        # Packages were discovered before the code existed (fresh checkout): add them.
        for package in codegen.generated_packages():
            if package not in self.packages:
                self.packages.append(package)
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
