"""The gRPC contract: code generation, message round trips, limits, the tensor codec and the
error mapping over real gRPC on loopback."""

from __future__ import annotations

import asyncio
import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from avatar_forcing.config import SAMPLES_PER_FRAME, paper
from services.common.torch_tensors import decode_torch
from services.wire import codegen, errors
from services.wire.errors import ValidationError
from services.wire.protos import SERVICES, Limit, grpc_options, pb, pb_grpc, service_full_name, servicer_function
from services.wire.tensors import decode, encode

# -- code generation ---------------------------------------------------------------------------


@pytest.fixture()
def proto_copy(tmp_path: Path) -> Path:
    root = tmp_path / "protos"
    shutil.copytree(codegen.PROTO_ROOT, root)
    return root


def test_generate_is_idempotent_and_regenerates_on_change(proto_copy: Path, tmp_path: Path):
    out = tmp_path / "generated"
    assert codegen.generate(proto_root=proto_copy, out_root=out) is True
    modules = codegen.expected_modules(proto_copy, out)
    assert modules and all(p.is_file() for p in modules)
    assert (out / "__init__.py").is_file() and (out / "avatar_forcing" / "v1" / "__init__.py").is_file()
    for path in modules:
        text = path.read_text()
        assert not re.search(r"^\s*(from|import) avatar_forcing\b", text, re.MULTILINE), path.name
        compile(text, str(path), "exec")
    assert (
        "from services._generated.avatar_forcing.v1 import tensor_pb2"
        in (out / "avatar_forcing/v1/generator_pb2.py").read_text()
    )

    assert codegen.generate(proto_root=proto_copy, out_root=out) is False  # up to date
    assert codegen.generate(force=True, proto_root=proto_copy, out_root=out) is True

    tensor = proto_copy / "avatar_forcing" / "v1" / "tensor.proto"
    tensor.write_text(tensor.read_text() + "\nmessage Extra { int32 x = 1; }\n")
    assert codegen.is_stale(proto_copy, out)
    assert codegen.generate(proto_root=proto_copy, out_root=out) is True
    assert "Extra" in (out / "avatar_forcing/v1/tensor_pb2.pyi").read_text()

    (proto_copy / "avatar_forcing" / "v1" / "extra.proto").write_text(
        'syntax = "proto3";\npackage avatar_forcing.v1;\n'
    )
    codegen.generate(proto_root=proto_copy, out_root=out)
    (proto_copy / "avatar_forcing" / "v1" / "extra.proto").unlink()
    codegen.generate(proto_root=proto_copy, out_root=out)
    assert not (out / "avatar_forcing" / "v1" / "extra_pb2.py").exists()  # obsolete modules go


def test_generate_reports_protoc_errors(proto_copy: Path, tmp_path: Path):
    broken = proto_copy / "avatar_forcing" / "v1" / "tensor.proto"
    broken.write_text(broken.read_text().replace("bytes data = 3;", "bytes data = ;"))
    with pytest.raises(codegen.ProtoGenError, match=r"tensor\.proto"):
        codegen.generate(proto_root=proto_copy, out_root=tmp_path / "generated")


def test_codegen_cli_check():
    codegen.generate()
    done = subprocess.run([sys.executable, "-m", "services.wire.codegen", "--check"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_field_is_documented():
    """Each field carries a comment (its meaning and limit) on its line or the line before."""
    field = re.compile(r"^\s*(optional |repeated )?[\w.]+ \w+ = \d+;")
    for path in codegen.proto_files():
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if field.match(line) and "//" not in line:
                assert lines[i - 1].strip().startswith("//"), f"{path.name}:{i + 1}: undocumented field {line.strip()}"


# -- messages and limits -----------------------------------------------------------------------


def test_services_have_stubs_servicers_and_registration():
    for service in SERVICES:
        assert hasattr(pb_grpc, f"{service}Stub")
        assert hasattr(pb_grpc, f"{service}Servicer")
        assert hasattr(pb_grpc, f"add_{service}Servicer_to_server")
        module, _, function = servicer_function(service).rpartition(".")  # Ray Serve's import path
        assert getattr(importlib.import_module(module), function) is getattr(pb_grpc, function)
        assert service_full_name(service) == f"avatar_forcing.v1.{service}"


def test_limits_agree_with_the_model():
    config = paper()
    assert config.sample_rate == Limit.SAMPLE_RATE and config.fps == Limit.FPS
    assert Limit.SAMPLES_PER_FRAME == SAMPLES_PER_FRAME == Limit.SAMPLE_RATE // Limit.FPS
    assert Limit.MOTION_DIM == config.flow.motion_dim == config.flow.audio_dim
    assert config.flow.window == Limit.MAX_FRAMES_PER_REQUEST
    config.flow.with_block(Limit.MAX_BLOCK)
    with pytest.raises(ValueError):
        config.flow.with_block(Limit.MAX_BLOCK + 1)
    assert Limit.MAX_CROPS_TENSOR_BYTES == 10 * 512 * 512 * 3 < Limit.MAX_MESSAGE_BYTES
    assert Limit.MAX_RAW_IMAGE_BYTES == Limit.MAX_IMAGE_SIDE**2 * 3
    assert 3 * Limit.MAX_TENSOR_BYTES > Limit.MAX_MESSAGE_BYTES > Limit.MAX_TENSOR_BYTES


def test_generate_block_round_trip():
    rows = np.random.default_rng(0).standard_normal((10, 512)).astype(np.float32)
    request = pb.GenerateBlockRequest(
        session_id="s-1",
        tenant_id="t_1",
        first_frame=40,
        avatar_audio=encode(rows),
        user_audio=encode(rows, dtype="BFLOAT16"),
        user_motion=encode(torch.from_numpy(rows), dtype="FLOAT16"),
        max_nfe=5,
    )
    parsed = pb.GenerateBlockRequest.FromString(request.SerializeToString())
    assert parsed == request
    np.testing.assert_array_equal(decode(parsed.avatar_audio, "avatar_audio", shape=(None, 512)), rows)
    np.testing.assert_allclose(decode(parsed.user_audio, "user_audio", shape=(None, 512)), rows, atol=2e-2, rtol=1e-2)
    np.testing.assert_allclose(decode(parsed.user_motion, "user_motion"), rows, atol=2e-3, rtol=1e-3)


def test_session_stream_messages_round_trip():
    options = pb.SessionOptions(block=5, audio_guidance=0.0, warm_start=True)
    assert options.HasField("audio_guidance") and not options.HasField("user_guidance")  # 0.0 is not "unset"
    start = pb.ClientMessage(start=pb.Start(avatar_id="a1", options=options, output_format=pb.JPEG))
    audio = pb.ClientMessage(
        audio=pb.AudioChunk(source=pb.AVATAR, timestamp_us=40_000, pcm_s16le=b"\0\0" * 640, sample_rate=16000)
    )
    frame = pb.ServerMessage(
        frame=pb.AvatarFrame(
            frame_index=7,
            timestamp_us=7 * 40_000,
            image=pb.Image(format=pb.RAW_RGB, width=16, height=16, data=bytes(16 * 16 * 3)),
            audio_pcm_s16le=bytes(2 * Limit.SAMPLES_PER_FRAME),
            timing=pb.FrameTiming(block_latency_ms=120.5, nfe_used=10, degradation=pb.REDUCED_NFE),
        )
    )
    for message in (start, audio, frame):
        assert type(message).FromString(message.SerializeToString()) == message
    assert start.WhichOneof("message") == "start" and frame.WhichOneof("message") == "frame"
    assert pb.Start.FromString(start.start.SerializeToString()).WhichOneof("avatar") == "avatar_id"


# -- tensor codec ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["FLOAT32", "FLOAT16", "BFLOAT16"])
def test_float_round_trip_numpy_and_torch(dtype: str):
    values = torch.randn(3, 4, 5)
    message = encode(values, dtype=dtype)
    assert list(message.shape) == [3, 4, 5] and message.dtype == pb.Tensor.DType.Value(dtype)
    back = decode_torch(message, "x")
    assert back.dtype == {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16}[dtype]
    expected = values.to(back.dtype)
    torch.testing.assert_close(back, expected, rtol=0, atol=0)
    np.testing.assert_array_equal(decode(message, "x"), expected.float().numpy())
    # numpy encodes bfloat16 with the same rounding as torch
    assert encode(values.numpy(), dtype=dtype).data == message.data


def test_uint8_round_trip_and_empty_tensor():
    crops = np.random.default_rng(1).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    message = encode(crops)
    assert message.dtype == pb.Tensor.UINT8
    np.testing.assert_array_equal(decode(message, "crops", shape=(None, None, None, 3), dtypes={"UINT8"}), crops)
    assert decode_torch(message, "crops").dtype == torch.uint8
    empty = encode(np.zeros((0, 512), np.float32))
    assert decode(empty, "latents", shape=(None, 512)).shape == (0, 512)
    assert decode_torch(empty, "latents").shape == (0, 512)


def _tensor(shape, dtype=pb.Tensor.FLOAT32, data=None) -> pb.Tensor:
    count = int(np.prod(shape)) if shape else 1
    return pb.Tensor(shape=shape, dtype=dtype, data=bytes(4 * count) if data is None else data)


@pytest.mark.parametrize(
    ("message", "kwargs", "field", "match"),
    [
        (_tensor([2, 512], data=b"\0" * 10), {}, "avatar_audio.data", "10 bytes; expected 4096"),
        (_tensor([2, 256]), {"shape": (None, 512)}, "avatar_audio.shape", r"expected \(n, 512\)"),
        (_tensor([512]), {"shape": (None, 512)}, "avatar_audio.shape", "got"),
        (_tensor([2, 512], dtype=pb.Tensor.DTYPE_UNSPECIFIED), {}, "avatar_audio.dtype", "DTYPE_UNSPECIFIED"),
        (_tensor([2, 512], dtype=99), {}, "avatar_audio.dtype", "unknown"),
        (_tensor([4], dtype=pb.Tensor.UINT8, data=b"abcd"), {"dtypes": {"FLOAT32"}}, "avatar_audio.dtype", "UINT8"),
        (_tensor([1, 1, 1, 1, 1]), {}, "avatar_audio.shape", "MAX_TENSOR_RANK"),
        (_tensor([2, 512]), {"max_bytes": 4095}, "avatar_audio", "exceeds the limit of 4095"),
        (
            _tensor([1], data=np.array([np.nan], "<f4").tobytes()),
            {},
            "avatar_audio",
            "NaN or infinite",
        ),
        (
            _tensor([2], pb.Tensor.FLOAT16, np.array([1, np.inf], "<f2").tobytes()),
            {},
            "avatar_audio",
            "flat index 1",
        ),
    ],
)
def test_decode_errors_name_the_field(message, kwargs, field, match):
    for decoder in (decode, decode_torch):
        with pytest.raises(ValidationError, match=match) as info:
            decoder(message, "avatar_audio", **kwargs)
        assert info.value.field == field
        assert str(info.value).startswith(f"{field}: ")


def test_oversize_tensor_rejected_on_both_sides():
    big = np.zeros((Limit.MAX_TENSOR_BYTES // 4 // 512 + 1, 512), np.float32)
    with pytest.raises(ValidationError, match="exceeds the limit") as info:
        encode(big, "latents")
    assert info.value.field == "latents"
    claimed = pb.Tensor(shape=[100_000, 512], dtype=pb.Tensor.FLOAT32)  # no data: the shape alone is too big
    with pytest.raises(ValidationError, match="exceeds the limit"):
        decode(claimed, "latents")
    crops = np.zeros((10, 512, 512, 3), np.uint8)
    with pytest.raises(ValidationError):
        encode(crops, "crops")
    message = encode(crops, "crops", max_bytes=Limit.MAX_CROPS_TENSOR_BYTES)
    assert decode(message, "crops", max_bytes=Limit.MAX_CROPS_TENSOR_BYTES).shape == (10, 512, 512, 3)


def test_encode_rejects_what_decode_would():
    with pytest.raises(ValidationError, match="NaN") as info:
        encode(torch.tensor([1.0, float("nan")]), "user_motion")
    assert info.value.field == "user_motion"
    with pytest.raises(ValidationError, match="UINT8"):
        encode(np.ones(3, np.float32), "crops", dtype="UINT8")
    with pytest.raises(ValidationError, match="int64"):
        encode(np.ones(3, np.int64), "x")
    with pytest.raises(ValidationError, match="expected a numpy array"):
        encode([1.0, 2.0], "x")  # type: ignore[arg-type]


# -- errors over real gRPC ---------------------------------------------------------------------


class _Decoder(pb_grpc.FrameDecoderServicer):
    @errors.grpc_errors
    async def Decode(self, request, context):
        latents = decode(request.latents, "latents", shape=(None, 512))
        if request.tenant_id != "t1":
            raise errors.TenantMismatchError("avatar_id", request.avatar_id, request.tenant_id)
        if request.avatar_id == "boom":
            raise RuntimeError("secret-token-123 leaked?")
        return pb.DecodeResponse(
            frames=[pb.DecodedFrame(frame_index=request.first_frame + i) for i in range(len(latents))]
        )


class _Session(pb_grpc.AvatarSessionServicer):
    @errors.grpc_errors
    async def Stream(self, request_iterator, context):
        async for message in request_iterator:
            if message.WhichOneof("message") != "start":
                raise ValidationError("message", "expected Start first")
            yield pb.ServerMessage(started=pb.Started(session_id="s1", fps=25))


def test_errors_map_to_status_codes_over_grpc():
    async def main():
        server = grpc.aio.server(options=grpc_options())
        pb_grpc.add_FrameDecoderServicer_to_server(_Decoder(), server)
        pb_grpc.add_AvatarSessionServicer_to_server(_Session(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options()) as channel:
                decoder = pb_grpc.FrameDecoderStub(channel)
                ok = await decoder.Decode(
                    pb.DecodeRequest(tenant_id="t1", avatar_id="a", first_frame=5, latents=encode(np.zeros((2, 512))))
                )
                assert [f.frame_index for f in ok.frames] == [5, 6]

                async def status(request):
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await decoder.Decode(request)
                    return info.value

                bad = await status(pb.DecodeRequest(tenant_id="t1", latents=_tensor([2, 256])))
                assert bad.code() == grpc.StatusCode.INVALID_ARGUMENT and bad.details().startswith("latents.shape:")
                mapped = errors.from_rpc_error(bad)
                assert isinstance(mapped, ValidationError) and mapped.field == "latents.shape"

                other = await status(
                    pb.DecodeRequest(tenant_id="t2", avatar_id="a", latents=encode(np.zeros((1, 512))))
                )
                assert other.code() == grpc.StatusCode.NOT_FOUND  # never PERMISSION_DENIED: ids do not leak
                assert isinstance(errors.from_rpc_error(other), errors.NotFoundError)
                assert other.details() == "avatar_id: tenant 't2' has no avatar 'a'; upload its portrait"

                crash = await status(
                    pb.DecodeRequest(tenant_id="t1", avatar_id="boom", latents=encode(np.zeros((1, 512))))
                )
                assert crash.code() == grpc.StatusCode.INTERNAL and "secret" not in crash.details()

                huge = pb.DecodeRequest(tenant_id="t1", latents=pb.Tensor(data=bytes(Limit.MAX_MESSAGE_BYTES + 1)))
                too_big = await status(huge)  # refused by the client's own limit
                assert too_big.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=grpc_options(2**25)) as loose:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        await pb_grpc.FrameDecoderStub(loose).Decode(huge)  # refused by the server
                    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

                session = pb_grpc.AvatarSessionStub(channel)
                call = session.Stream()
                await call.write(pb.ClientMessage(start=pb.Start(avatar_id="a")))
                assert (await call.read()).started.session_id == "s1"
                await call.write(pb.ClientMessage(end_of_input=pb.EndOfInput()))
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert info.value.details() == "message: expected Start first"
        finally:
            await server.stop(None)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (ValidationError("x", "bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (ValueError("block: expected 1 <= block"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.SessionNotFoundError("s1"), grpc.StatusCode.NOT_FOUND),
        (errors.CapacityExceededError("full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.StoreUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.TenantMismatchError("session_id", "s1", "t2"), grpc.StatusCode.NOT_FOUND),
        (errors.OwnershipLostError("moved"), grpc.StatusCode.ABORTED),
        (errors.FrameConflictError("gap"), grpc.StatusCode.FAILED_PRECONDITION),
        (KeyError("oops"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of(error, code):
    assert errors.status_of(error)[0] == code
    assert errors.error_fields(error)[0] == code.value[0]
