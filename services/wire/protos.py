"""The one import point of the gRPC contract (`protos/avatar_forcing/v1/*.proto`).

    from services.wire.protos import pb, pb_grpc, Limit

    request = pb.GenerateBlockRequest(session_id="s1", tenant_id="t1", first_frame=0)
    stub = pb_grpc.MotionGeneratorStub(channel)
    pb_grpc.add_MotionGeneratorServicer_to_server(servicer, server)
    Limit.MAX_TENSOR_BYTES  # 4194304

`pb` holds every message and enum of the package (all files merged; names are unique within
a proto package), `pb_grpc` every stub, servicer and `add_*_to_server`. The per-file modules
are importable too (`from services.wire.protos import generator_pb2`).

In a source checkout the code is generated on first import when it is missing or the .proto
files changed (`services.wire.codegen`); an installed wheel ships it pre-generated.

Ray Serve's gRPC proxy takes the generated registration functions by import path, e.g.
"services._generated.avatar_forcing.v1.generator_pb2_grpc.add_MotionGeneratorServicer_to_server"
(see `servicer_function`); those processes import the generated modules directly, so the code
must exist there (`pip install .`, or `python -m services.wire.codegen` in the image).
"""

from __future__ import annotations

import importlib
import types
import warnings
from collections.abc import Sequence
from typing import Any

from services.wire import codegen

MODULES = ("limits", "tensor", "common", "audio_features", "motion_encoder", "generator", "decoder", "session")
# service -> the .proto file (module stem) that defines it
SERVICE_MODULES = {
    "AudioFeatures": "audio_features",
    "MotionEncoder": "motion_encoder",
    "MotionGenerator": "generator",
    "FrameDecoder": "decoder",
    "AvatarSession": "session",
}
SERVICES = tuple(SERVICE_MODULES)
PACKAGE = f"{codegen.GENERATED_PACKAGE}.{codegen.PROTO_PACKAGE.replace('/', '.')}"


def _ensure_generated() -> None:
    if not codegen.proto_files():
        return  # installed without the sources: the wheel carries the generated modules
    if not codegen.is_stale():
        return  # read-only check: a read-only source tree with fresh code is fine
    try:
        if codegen.generate():
            importlib.invalidate_caches()
    except (OSError, codegen.ProtoGenError) as exc:
        if not all(p.is_file() for p in codegen.expected_modules()):
            raise
        warnings.warn(f"protos: using the existing generated code; regeneration failed: {exc}", stacklevel=2)


def _load(suffix: str) -> dict[str, types.ModuleType]:
    return {name: importlib.import_module(f"{PACKAGE}.{name}{suffix}") for name in MODULES}


def _merge(name: str, modules: Sequence[types.ModuleType]) -> types.SimpleNamespace:
    """One namespace of the public names of several generated modules (duplicates are an error)."""
    merged: dict[str, Any] = {}
    for module in modules:
        for key, value in vars(module).items():
            if key.startswith("_") or key == "DESCRIPTOR" or isinstance(value, types.ModuleType):
                continue
            if key in {"grpc", "warnings", "GRPC_GENERATED_VERSION", "GRPC_VERSION", "first_version_is_lower"}:
                continue
            if key in merged and merged[key] is not value:
                raise ImportError(f"protos: {name}.{key} is defined by two generated modules")
            merged[key] = value
    return types.SimpleNamespace(**merged)


_ensure_generated()
_pb2 = _load("_pb2")
_pb2_grpc = _load("_pb2_grpc")

pb = _merge("pb", list(_pb2.values()))
pb_grpc = _merge("pb_grpc", list(_pb2_grpc.values()))

limits_pb2 = _pb2["limits"]
tensor_pb2 = _pb2["tensor"]
common_pb2 = _pb2["common"]
audio_features_pb2 = _pb2["audio_features"]
motion_encoder_pb2 = _pb2["motion_encoder"]
generator_pb2 = _pb2["generator"]
decoder_pb2 = _pb2["decoder"]
session_pb2 = _pb2["session"]
audio_features_pb2_grpc = _pb2_grpc["audio_features"]
motion_encoder_pb2_grpc = _pb2_grpc["motion_encoder"]
generator_pb2_grpc = _pb2_grpc["generator"]
decoder_pb2_grpc = _pb2_grpc["decoder"]
session_pb2_grpc = _pb2_grpc["session"]

# The contract's limits (limits.proto), e.g. Limit.MAX_TENSOR_BYTES; plain ints.
Limit = types.SimpleNamespace(**{v.name: v.number for v in pb.Limits.Limit.DESCRIPTOR.values})


def grpc_options(max_message_bytes: int = Limit.MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Channel and server options that apply the contract's message size limit."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


def _check_service(service: str) -> str:
    if service not in SERVICE_MODULES:
        raise ValueError(f"service: unknown {service!r}; expected one of {SERVICES}")
    return service


def service_full_name(service: str) -> str:
    """e.g. "MotionGenerator" -> "avatar_forcing.v1.MotionGenerator" (for routing and reflection)."""
    return f"avatar_forcing.v1.{_check_service(service)}"


def servicer_function(service: str) -> str:
    """Import path of `add_<service>Servicer_to_server`, for Ray Serve's `grpc_servicer_functions`."""
    module = SERVICE_MODULES[_check_service(service)]
    return f"{PACKAGE}.{module}_pb2_grpc.add_{service}Servicer_to_server"
