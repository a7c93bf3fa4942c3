"""The Python client library (services.client) against a small fake AvatarSession servicer on a
real grpc.aio server on loopback: chunking and timestamps, frame decoding, pacing, interrupts,
non-fatal Error messages and gRPC statuses mapped to typed exceptions.

The fake answers Started, then one AvatarFrame per 640 avatar samples received (an image whose
pixels encode the frame index, and exactly those samples as the frame's audio).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import warnings
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import cv2
import grpc
import numpy as np
import pytest

from services.client import (
    AnswerTimeoutError,
    AvatarClient,
    CapacityExceededError,
    ServerMessageError,
    ServerWarning,
    SessionClosedError,
    UnauthenticatedError,
    ValidationError,
)
from services.client.audio import to_pcm16
from services.client.rate_limit import RateLimiter
from services.common.auth import AuthError, mint_token, tenant_from_grpc_metadata
from services.wire.errors import status_of
from services.wire.protos import Limit, grpc_options, pb, pb_grpc

SECRET = "test-secret-of-at-least-thirty-two-bytes"
SIZE = 32  # the fake's avatar frames are SIZE x SIZE


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def pixel_of(index: int) -> int:
    return (index * 10 + 5) % 256


def portrait_png() -> bytes:
    image = np.full((64, 64, 3), 128, np.uint8)
    return cv2.imencode(".png", image)[1].tobytes()


class FakeAvatarSession(pb_grpc.AvatarSessionServicer):
    """Echo-style AvatarSession: one frame per 640 avatar samples; records what it received."""

    def __init__(self) -> None:
        self.received: list[pb.ClientMessage] = []
        self.tenants: list[str] = []
        self.gate_on_user_audio = False  # emit frames only as far as user audio has arrived
        self.silent = False  # never answer Start

    async def Stream(self, request_iterator, context):
        requests = request_iterator.__aiter__()
        first = await requests.__anext__()
        if first.WhichOneof("message") != "start":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message: expected Start first")
        start = first.start
        try:
            tenant = tenant_from_grpc_metadata(context.invocation_metadata(), start.auth_token, secret=SECRET)
        except AuthError as exc:
            await context.abort(*status_of(exc))
        self.tenants.append(tenant)
        if self.silent:
            await asyncio.sleep(3600)
        if start.WhichOneof("avatar") == "portrait" and len(start.portrait) < 64:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"portrait: got {len(start.portrait)} bytes; expected a decodable JPEG or PNG",
            )
        output_format = start.output_format or pb.JPEG
        block = start.options.block if start.options.HasField("block") else 10
        yield pb.ServerMessage(
            started=pb.Started(
                session_id="fake-1",
                fps=25,
                block=block,
                sample_rate=16000,
                samples_per_frame=640,
                width=SIZE,
                height=SIZE,
                output_format=output_format,
            )
        )
        pending = np.zeros(0, np.int16)
        index = user_samples = 0
        async for message in requests:
            self.received.append(message)
            kind = message.WhichOneof("message")
            if kind == "audio":
                samples = np.frombuffer(message.audio.pcm_s16le, "<i2")
                if message.audio.source == pb.AVATAR:
                    pending = np.concatenate([pending, samples])
                else:
                    user_samples += samples.shape[0]
            elif kind == "video":
                if message.video.image.width == 16:  # the fake's trigger for a fatal error
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "video: too many frames buffered")
                data = np.frombuffer(message.video.image.data, np.uint8)
                if cv2.imdecode(data, cv2.IMREAD_COLOR) is None:
                    yield pb.ServerMessage(
                        error=pb.Error(code=3, message="video.image: does not decode as JPEG; dropped")
                    )
            elif kind == "interrupt":
                pending = np.zeros(0, np.int16)
                yield pb.ServerMessage(interrupted=pb.Interrupted(frame_index=index))
            elif kind == "end_of_input":
                if pending.shape[0]:
                    pending = np.pad(pending, (0, -pending.shape[0] % 640))
                    self.gate_on_user_audio = False
                else:
                    break
            while pending.shape[0] >= 640 and (not self.gate_on_user_audio or (index + 1) * 640 <= user_samples):
                yield self.frame(index, pending[:640], output_format)
                pending, index = pending[640:], index + 1
            if kind == "end_of_input":
                break

    @staticmethod
    def frame(index: int, audio: np.ndarray, output_format: int) -> pb.ServerMessage:
        pixels = np.full((SIZE, SIZE, 3), pixel_of(index), np.uint8)
        if output_format == pb.RAW_RGB:
            image = pb.Image(format=pb.RAW_RGB, width=SIZE, height=SIZE, data=pixels.tobytes())
        else:
            image = pb.Image(format=pb.JPEG, data=cv2.imencode(".jpg", pixels)[1].tobytes())
        timing = pb.FrameTiming(block_latency_ms=10.0 + index, generated_unix_ms=int(time.time() * 1000), nfe_used=4)
        return pb.ServerMessage(
            frame=pb.AvatarFrame(
                frame_index=index,
                timestamp_us=index * 40000,
                image=image,
                audio_pcm_s16le=audio.astype("<i2").tobytes(),
                timing=timing,
            )
        )

    def audio_chunks(self, source: int = pb.AVATAR) -> list[pb.AudioChunk]:
        return [m.audio for m in self.received if m.WhichOneof("message") == "audio" and m.audio.source == source]


@contextlib.asynccontextmanager
async def fake_server() -> AsyncIterator[tuple[str, FakeAvatarSession]]:
    servicer = FakeAvatarSession()
    server = grpc.aio.server(options=grpc_options())
    pb_grpc.add_AvatarSessionServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        await server.stop(grace=None)


def token(tenant: str = "acme") -> str:
    return mint_token(tenant, SECRET, ttl_s=600)


async def collect(stream) -> list:
    return [frame async for frame in stream.frames()]


# --- pure helpers -----------------------------------------------------------------------------------


def test_to_pcm16_scales_floats_and_keeps_int16():
    assert to_pcm16(np.array([0.0, 1.0, -1.0, 2.0], np.float32)).tolist() == [0, 32767, -32767, 32767]
    ints = np.array([1, -2, 3], np.int16)
    assert to_pcm16(ints) is ints
    with pytest.raises(ValidationError, match="shape"):
        to_pcm16(np.zeros((2, 10), np.float32))
    with pytest.raises(ValidationError, match="dtype int32"):
        to_pcm16(np.zeros(10, np.int32))
    with pytest.raises(ValidationError, match="NaN"):
        to_pcm16(np.array([np.nan], np.float32))


def test_rate_limiter_holds_to_the_window():
    async def main() -> float:
        limiter = RateLimiter(5, period=0.2)
        began = time.monotonic()
        for _ in range(12):  # 5 at once, 5 after 0.2 s, 2 after 0.4 s
            await limiter.acquire()
        return time.monotonic() - began

    assert 0.38 <= run(main()) < 1.5


def test_session_arguments_are_checked_before_connecting():
    client = AvatarClient("127.0.0.1:1", token())
    with pytest.raises(ValidationError, match="exactly one"):
        client.session()
    with pytest.raises(ValidationError, match="exactly one"):
        client.session(portrait_png(), avatar_id="a")
    with pytest.raises(ValidationError, match="portrait"):
        client.session(b"GIF89a....")
    with pytest.raises(ValidationError, match="at most 1048576"):
        client.session(b"\x89PNG\r\n\x1a\n" + bytes(Limit.MAX_IMAGE_BYTES))
    with pytest.raises(ValidationError, match="options"):
        client.session(portrait_png(), options={"blocks": 5})
    assert "token" not in repr(client) or "<set>" in repr(client)


# --- sessions against the fake ------------------------------------------------------------------------


def test_audio_is_chunked_and_timestamped_and_frames_come_back_decoded():
    async def main():
        async with fake_server() as (target, fake), AvatarClient(target, token()) as client:
            async with client.session(portrait_png(), options={"block": 5}) as s:
                assert (s.session_id, s.started.block, s.started.width) == ("fake-1", 5, SIZE)
                rng = np.random.default_rng(0)
                audio = rng.uniform(-0.5, 0.5, 40000).astype(np.float32)  # 2.5 s
                assert await s.send_avatar_audio(audio) == 0
                more = rng.integers(-1000, 1000, 320, dtype=np.int16)
                assert await s.send_avatar_audio(more) == 2_500_000  # follows the previous audio
                await s.end_input()
                frames = await collect(s)
            return fake, audio, more, frames

    fake, audio, more, frames = run(main())
    chunks = fake.audio_chunks()
    assert [len(c.pcm_s16le) // 2 for c in chunks] == [16000, 16000, 8000, 320]
    assert [c.timestamp_us for c in chunks] == [0, 1_000_000, 2_000_000, 2_500_000]
    assert all(c.sample_rate == 16000 for c in chunks)
    sent = np.concatenate([to_pcm16(audio), more])
    assert np.array_equal(np.concatenate([np.frombuffer(c.pcm_s16le, "<i2") for c in chunks]), sent)

    assert [f.index for f in frames] == list(range(63))  # 40320 samples / 640
    assert all(f.timestamp_us == f.index * 40000 for f in frames)
    assert np.array_equal(np.concatenate([f.audio for f in frames]), sent)
    assert frames[0].audio.dtype == np.int16 and frames[0].audio.shape == (640,)
    for f in frames[:5]:
        assert f.image.shape == (SIZE, SIZE, 3) and f.image.dtype == np.uint8
        assert abs(int(f.image[SIZE // 2, SIZE // 2, 0]) - pixel_of(f.index)) <= 2  # JPEG
    assert frames[3].timing.block_latency_ms == pytest.approx(13.0)
    assert frames[3].timing.nfe_used == 4 and frames[3].timing.degradation == "DEGRADATION_NONE"
    assert frames[3].timing.received_unix_ms >= frames[3].timing.generated_unix_ms - 1
    assert frames[1].audio_float32().dtype == np.float32


def test_raw_rgb_output_user_media_timestamps_and_token_in_start():
    async def main():
        async with fake_server() as (target, fake):
            client = AvatarClient(target, token("globex"), token_in_start=True)
            async with client.session(portrait_png(), output_format=pb.RAW_RGB, audio_chunk_samples=640) as s:
                camera = np.zeros((48, 64, 3), np.uint8)
                stamps = [await s.send_user_frame(camera) for _ in range(3)]
                stamps.append(await s.send_user_frame(camera, timestamp_us=200_000, format=pb.PNG))
                with pytest.raises(ValidationError, match="timestamp_us"):
                    await s.send_user_frame(camera, timestamp_us=100_000)  # before the previous frame
                await s.send_user_audio(np.zeros(1600, np.float32))
                with pytest.raises(ValidationError, match="overlap"):
                    await s.send_user_audio(np.zeros(10, np.float32), timestamp_us=50_000)
                await s.send_user_audio(np.zeros(10, np.float32), timestamp_us=200_000)  # a gap is fine
                await s.send_avatar_audio(np.zeros(1280, np.int16))
                await s.end_input()
                frames = await collect(s)
            await client.close()
            return fake, stamps, frames

    fake, stamps, frames = run(main())
    assert fake.tenants == ["globex"]
    assert stamps == [0, 40000, 80000, 200_000]
    videos = [m.video for m in fake.received if m.WhichOneof("message") == "video"]
    assert [v.image.format for v in videos] == [pb.JPEG] * 3 + [pb.PNG]
    assert (videos[0].image.width, videos[0].image.height) == (64, 48)
    user = fake.audio_chunks(pb.USER)
    assert [(c.timestamp_us, len(c.pcm_s16le) // 2) for c in user] == [
        (0, 640),
        (40000, 640),
        (80000, 320),
        (200_000, 10),
    ]
    assert [f.index for f in frames] == [0, 1]
    assert np.all(frames[1].image == pixel_of(1))  # RAW_RGB is exact


def test_interrupt_answers_and_avatar_audio_continues_from_the_interruption():
    async def main():
        async with fake_server() as (target, _fake), AvatarClient(target, token()) as client:
            async with client.session(portrait_png()) as s:
                await s.send_avatar_audio(np.zeros(1000, np.int16))  # 1 frame + 360 pending samples
                index = await s.interrupt()
                stamp = await s.send_avatar_audio(np.ones(640, np.int16))
                await s.end_input()
                frames = await collect(s)
            return index, stamp, frames

    index, stamp, frames = run(main())
    assert index == 1 and stamp == 40000
    assert [f.index for f in frames] == [0, 1] and np.all(frames[1].audio == 1)


def test_media_is_held_back_while_too_far_ahead_of_the_frames():
    async def main():
        async with fake_server() as (target, fake), AvatarClient(target, token()) as client:
            fake.gate_on_user_audio = True
            async with client.session(portrait_png(), max_ahead_ms=200, audio_chunk_samples=640) as s:
                avatar = asyncio.create_task(s.send_avatar_audio(np.zeros(16000, np.int16)))
                await asyncio.sleep(0.3)
                held = (avatar.done(), len(fake.audio_chunks()))
                await s.send_user_audio(np.zeros(16000, np.int16))  # lets the fake emit frames
                await avatar
                await s.end_input()
                frames = await collect(s)
            return held, frames

    (done, chunks_while_held), frames = run(main())
    assert not done and chunks_while_held == 5  # chunks ending at 40 ... 200 ms, then held
    assert len(frames) == 25


def test_non_fatal_errors_warn_by_default_and_raise_on_request():
    bad_jpeg = b"\xff\xd8\xff" + b"garbage" * 10

    async def main(on_error):
        async with fake_server() as (target, _fake), AvatarClient(target, token()) as client:
            async with client.session(portrait_png(), on_error=on_error) as s:
                await s.send_avatar_audio(np.zeros(640, np.int16))
                await s.send_user_frame(bad_jpeg)
                await s.send_avatar_audio(np.zeros(640, np.int16))
                await s.end_input()
                got: list[Any] = []
                while True:
                    try:
                        async for frame in s.frames():
                            got.append(frame.index)
                        break
                    except ServerMessageError as exc:
                        got.append(exc)
            return got, s.errors

    with pytest.warns(ServerWarning, match="video.image: does not decode"):
        got, errors = run(main("warn"))
    assert got == [0, 1] and len(errors) == 1 and errors[0].code == 3

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got, errors = run(main("raise"))
    assert got[0] == 0 and isinstance(got[1], ServerMessageError) and got[2:] == [1]
    assert got[1].code == grpc.StatusCode.INVALID_ARGUMENT and "video.image" in str(got[1])

    seen = []
    run(main(seen.append))
    assert [e.message for e in seen] == ["video.image: does not decode as JPEG; dropped"]


def test_statuses_become_typed_exceptions_with_the_server_message():
    async def main():
        async with fake_server() as (target, _fake):
            async with AvatarClient(target, token()) as client:
                with pytest.raises(ValidationError) as invalid:
                    async with client.session(b"\x89PNG\r\n\x1a\nshort"):
                        pass
            async with AvatarClient(target, mint_token("acme", "another-secret-of-thirty-two-bytes!!")) as client:
                with pytest.raises(UnauthenticatedError, match="signature"):
                    async with client.session(portrait_png()):
                        pass
            async with AvatarClient(target, None) as client:
                with pytest.raises(UnauthenticatedError, match="no token"):
                    async with client.session(portrait_png()):
                        pass
            async with AvatarClient(target, token()) as client, client.session(portrait_png()) as s:
                await s.send_avatar_audio(np.zeros(1280, np.int16))
                await s.send_user_frame(np.zeros((16, 16, 3), np.uint8))
                frames = []
                with pytest.raises(CapacityExceededError, match="too many frames buffered") as exhausted:
                    async for frame in s.frames():
                        frames.append(frame.index)
                with pytest.raises(CapacityExceededError):
                    await s.send_avatar_audio(np.zeros(640, np.int16))
            return invalid.value, exhausted.value, frames

    invalid, exhausted, frames = run(main())
    assert invalid.code == grpc.StatusCode.INVALID_ARGUMENT and invalid.field == "portrait"
    assert str(invalid) == "portrait: got 13 bytes; expected a decodable JPEG or PNG"
    assert exhausted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert frames == [0, 1]  # the frames before the failure still arrive


def test_sending_after_end_input_or_close_is_refused():
    async def main():
        async with fake_server() as (target, _fake), AvatarClient(target, token()) as client:
            async with client.session(portrait_png()) as s:
                await s.end_input()
                with pytest.raises(SessionClosedError, match="end_input"):
                    await s.send_avatar_audio(np.zeros(640, np.int16))
                assert await collect(s) == []
                assert await collect(s) == []  # iterating again ends at once
            async with client.session(portrait_png()) as s:
                await s.send_avatar_audio(np.zeros(640, np.int16))
            assert s.done  # leaving the block cancelled the call
            with pytest.raises(SessionClosedError):
                await s.send_avatar_audio(np.zeros(640, np.int16))

    run(main())


def test_a_server_that_does_not_answer_start_times_out():
    async def main():
        async with fake_server() as (target, fake), AvatarClient(target, token()) as client:
            fake.silent = True
            with pytest.raises(AnswerTimeoutError, match="Started: no answer") as caught:
                async with client.session(portrait_png(), start_timeout_s=0.3):
                    pass
            return caught.value

    assert run(main()).code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_unreachable_server_is_unavailable():
    async def main():
        async with AvatarClient("127.0.0.1:1", token()) as client:
            with pytest.raises(Exception) as caught:
                async with client.session(portrait_png()):
                    pass
            return caught.value

    error = run(main())
    assert error.code == grpc.StatusCode.UNAVAILABLE


# --- the `avatar-forcing client` command ----------------------------------------------------------


def test_client_cli_streams_the_samples_and_writes_the_video(tmp_path, capsys):
    import threading
    from pathlib import Path

    from avatar_forcing.media.io import load_audio, read_video
    from services.client import cli

    samples = Path(__file__).resolve().parents[2] / "samples"
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    stop = asyncio.Event()

    async def serve() -> None:
        async with fake_server() as (target, _fake):
            ready.append(target)
            await stop.wait()

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not ready and time.monotonic() < deadline:
            time.sleep(0.01)
        out = tmp_path / "live.mp4"
        argv = ["--target", ready[0], "--token", token(), "--portrait", str(samples / "portrait.png")]
        argv += ["--avatar-audio", str(samples / "avatar_speech.wav"), "--user-video", str(samples / "user.mp4")]
        argv += ["--out", str(out), "--block", "5"]
        assert cli.main(argv) == 0
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)

    expected = -(-load_audio(samples / "avatar_speech.wav").shape[0] // 640)
    printed = capsys.readouterr().out
    assert f"({expected} of {expected} frames" in printed and "block latency (server): p50" in printed
    assert "first frame:" in printed
    clip = read_video(out)
    assert clip.num_frames == expected and clip.frames.shape[1:] == (SIZE, SIZE, 3)
    assert clip.audio is not None and abs(clip.audio.shape[0] - expected * 640) <= 2048


def test_client_cli_reports_bad_inputs_and_server_errors(tmp_path, capsys):
    from services.client import cli

    argv = ["--target", "127.0.0.1:1", "--portrait", str(tmp_path / "missing.png")]
    argv += ["--avatar-audio", "a.wav", "--user-video", "u.mp4", "--out", str(tmp_path / "o.mp4")]
    assert cli.main(argv) == 2
    assert "file not found" in capsys.readouterr().err
