"""Build-time code generation for the gRPC contract in `protos/`.

`generate()` runs `grpc_tools.protoc` (the installed grpcio-tools) over
`protos/avatar_forcing/v1/*.proto` and writes importable modules:

    services/_generated/avatar_forcing/v1/<name>_pb2.py       messages
    services/_generated/avatar_forcing/v1/<name>_pb2.pyi      type stubs
    services/_generated/avatar_forcing/v1/<name>_pb2_grpc.py  stubs, servicers, add_*_to_server

protoc writes cross-file imports as `from avatar_forcing.v1 import tensor_pb2`, which would
resolve to the model library `avatar_forcing/`; they are rewritten to
`from services._generated.avatar_forcing.v1 import tensor_pb2`.

Idempotent: a stamp file records a digest of the .proto sources, the grpcio-tools version
and this generator's version; while it matches nothing is regenerated (unless `force`), so
editing (not merely touching) a .proto regenerates. Concurrent callers (several processes
importing `services.wire.protos` at once) are serialised by a file lock, and each module
is replaced atomically.

This file uses only the standard library (grpc_tools runs in a subprocess) so that
`setup.py` can load it by path before the package is importable.

    python -m services.wire.codegen [--force] [--check]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "services" / "_generated"
PROTO_PACKAGE = "avatar_forcing/v1"  # directory of the .proto files under PROTO_ROOT
GENERATED_PACKAGE = "services._generated"
GENERATOR_VERSION = "3"  # bump when the rewrite rules change: forces regeneration
STAMP = ".stamp"
LOCK = ".lock"

# `from avatar_forcing.v1 import x_pb2 as ...` -> `from services._generated.avatar_forcing.v1 import ...`
_IMPORT_RE = re.compile(r"^(\s*)from (avatar_forcing(?:\.\w+)*) import ", re.MULTILINE)
_LEFTOVER_RE = re.compile(r"^\s*(?:from|import) avatar_forcing\b", re.MULTILINE)


class ProtoGenError(RuntimeError):
    """protoc failed, or there is nothing to generate from."""


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted((proto_root / PROTO_PACKAGE).glob("*.proto"))


def generated_packages() -> list[str]:
    """The Python packages `generate` creates (for setup.py's package list)."""
    parts = [GENERATED_PACKAGE, *PROTO_PACKAGE.split("/")]
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def expected_modules(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> list[Path]:
    out = out_root / PROTO_PACKAGE
    return [out / f"{p.stem}{suffix}" for p in proto_files(proto_root) for suffix in ("_pb2.py", "_pb2_grpc.py")]


def digest(proto_root: Path = PROTO_ROOT) -> str:
    """Hash of the sources and tools that determine the generated code."""
    h = hashlib.sha256()
    h.update(f"generator={GENERATOR_VERSION};grpcio-tools={_tools_version()}\n".encode())
    for path in proto_files(proto_root):
        h.update(path.relative_to(proto_root).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def is_stale(proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> bool:
    """True when a generated module is missing or the sources changed since the last run."""
    stamp = out_root / STAMP
    if not stamp.is_file() or not all(p.is_file() for p in expected_modules(proto_root, out_root)):
        return True
    return stamp.read_text().strip() != digest(proto_root)


def generate(force: bool = False, proto_root: Path = PROTO_ROOT, out_root: Path = OUT_ROOT) -> bool:
    """Generate the Python modules if they are missing or stale; True when it (re)generated."""
    protos = proto_files(proto_root)
    if not protos:
        raise ProtoGenError(f"codegen: no .proto files under {proto_root / PROTO_PACKAGE}")
    out_root.mkdir(parents=True, exist_ok=True)
    with _locked(out_root / LOCK):
        if not force and not is_stale(proto_root, out_root):
            return False
        with tempfile.TemporaryDirectory(dir=out_root, prefix=".tmp-") as tmp:
            tmp_root = Path(tmp)
            _run_protoc(protos, proto_root, tmp_root)
            _rewrite_imports(tmp_root / PROTO_PACKAGE)
            _install(tmp_root, out_root)
        _write_atomic(out_root / STAMP, digest(proto_root) + "\n")
    return True


# -- internals ---------------------------------------------------------------------------------


def _tools_version() -> str:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return "missing"


def _grpc_tools_include() -> Path:
    """The well-known .proto files (google/protobuf/*.proto) shipped with grpcio-tools."""
    spec = importlib.util.find_spec("grpc_tools")
    if spec is None or not spec.submodule_search_locations:
        raise ProtoGenError(
            "codegen: grpcio-tools is not installed; expected `pip install grpcio-tools` "
            "(it is in the build requirements and the `serve` extra)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "_proto"


def _run_protoc(protos: list[Path], proto_root: Path, out: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={proto_root}",
        f"--proto_path={_grpc_tools_include()}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(str(p) for p in protos),
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ProtoGenError(f"codegen: protoc failed (exit {result.returncode}):\n{result.stderr.strip()}")


def _rewrite_imports(package_dir: Path) -> None:
    for path in sorted(package_dir.glob("*_pb2*.py*")):
        text = _IMPORT_RE.sub(rf"\1from {GENERATED_PACKAGE}.\2 import ", path.read_text())
        # Messages are registered under their module's name; it must be importable for pickling
        # (Ray sends proto messages between processes).
        text = text.replace(
            "BuildTopDescriptorsAndMessages(DESCRIPTOR, 'avatar_forcing.v1.",
            f"BuildTopDescriptorsAndMessages(DESCRIPTOR, '{GENERATED_PACKAGE}.avatar_forcing.v1.",
        )
        if _LEFTOVER_RE.search(text):
            raise ProtoGenError(f"codegen: {path.name}: an import of avatar_forcing.* was left unrewritten")
        path.write_text(text)


def _install(tmp_root: Path, out_root: Path) -> None:
    """Move the fresh modules into place (each replace is atomic) and drop obsolete ones."""
    parts = PROTO_PACKAGE.split("/")
    for depth in range(len(parts) + 1):
        package = out_root.joinpath(*parts[:depth])
        package.mkdir(parents=True, exist_ok=True)
        init = package / "__init__.py"
        if not init.is_file():
            _write_atomic(init, '"""Generated by services.wire.codegen from protos/; do not edit."""\n')
    target = out_root / PROTO_PACKAGE
    fresh = {p.name for p in (tmp_root / PROTO_PACKAGE).glob("*_pb2*.py*")}
    for name in sorted(fresh):
        os.replace(tmp_root / PROTO_PACKAGE / name, target / name)
    for old in target.glob("*_pb2*.py*"):
        if old.name not in fresh:
            old.unlink()
    shutil.rmtree(target / "__pycache__", ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock; generation is still atomic per file
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.wire.codegen", description=__doc__.split("\n")[0])
    parser.add_argument("--force", action="store_true", help="regenerate even when up to date")
    parser.add_argument("--check", action="store_true", help="exit 1 if the generated code is missing or stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = is_stale()
        print(f"codegen: {OUT_ROOT} is {'stale or missing' if stale else 'up to date'}")
        return 1 if stale else 0
    try:
        changed = generate(force=args.force)
    except ProtoGenError as exc:
        print(exc, file=sys.stderr)
        return 1
    count = len(expected_modules())
    print(f"codegen: {'generated' if changed else 'up to date:'} {count} modules in {OUT_ROOT / PROTO_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
