"""`avatar-forcing client`: stream a portrait, the avatar's audio and a user video through a
running service and write the avatar video it answers with.

    avatar-forcing client --target 127.0.0.1:9000 --token "$TOKEN" \\
        --portrait samples/portrait.png --avatar-audio samples/avatar_speech.wav \\
        --user-video samples/user.mp4 --out out/live.mp4 --realtime

The session is as long as the avatar audio (like `avatar-forcing generate`): the user video is
cut or extended with its last frame, the user audio (the video's own, or --user-audio) cut or
padded with silence. Media time advances one frame (40 ms) at a time: the user's camera frame
and microphone slice of that frame, and the avatar audio one second at a time ahead of it.
`--realtime` sends at wall-clock speed, as a live call would; without it the client sends as
fast as the contract allows (message rate and buffered-audio limits). The frames that come back
are written with their audio slices; the summary gives the first-frame latency and the p50 /
p95 of the server's block latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from services.client.frames import FRAME_US, Frame
from services.client.session import AvatarClient
from services.wire.errors import ServerError, ServiceError
from services.wire.images import portrait_bytes
from services.wire.protos import Limit, pb

TOKEN_ENV = "AVATAR_FORCING_TOKEN"
AVATAR_CHUNK_FRAMES = Limit.FPS  # avatar audio goes out one second at a time


@dataclass
class Inputs:
    portrait: bytes | None
    avatar_audio: np.ndarray  # (T * SAMPLES_PER_FRAME,) float32
    user_frames: np.ndarray  # (T, H, W, 3) uint8
    user_audio: np.ndarray  # (T * SAMPLES_PER_FRAME,) float32
    num_frames: int


@dataclass
class Stats:
    started_at: float = 0.0  # monotonic seconds: Started received
    first_input_at: float | None = None  # monotonic: first media message sent
    first_frame_at: float | None = None  # monotonic: first frame received
    last_frame_at: float | None = None
    frames: int = 0
    block_latency_ms: list[float] = field(default_factory=list)
    frame_delay_ms: list[float] = field(default_factory=list)  # realtime: arrival - end of the frame's media
    degraded: dict[str, int] = field(default_factory=dict)
    # Per frame, in arrival order: what serve-bench derives its per-block figures from.
    indices: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic
    degradation: list[str] = field(default_factory=list)
    nfe: list[int] = field(default_factory=list)
    clock_start: float = 0.0  # monotonic start of the media clock: frame i is sent at + 40 ms (i + 1)
    errors: list[ServerError] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)
    session_id: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar-forcing client",
        description="stream a portrait + avatar audio + user video through a server; write the avatar video",
    )
    parser.add_argument("--target", default="127.0.0.1:9000", help="gRPC endpoint (host:port)")
    parser.add_argument("--token", default=None, help=f"tenant token (default: ${TOKEN_ENV})")
    parser.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    avatar = parser.add_mutually_exclusive_group(required=True)
    avatar.add_argument("--portrait", type=Path, help="image with the avatar's face (JPEG/PNG)")
    avatar.add_argument("--avatar-id", help="an avatar registered with the gateway")
    parser.add_argument(
        "--session-id",
        default="",
        help="stream a session created through the gateway (POST /v1/sessions; --token: its session_token)",
    )
    parser.add_argument("--avatar-audio", type=Path, required=True, help="what the avatar says (sets the length)")
    parser.add_argument("--user-video", type=Path, required=True, help="the user's camera (and voice, if it has audio)")
    parser.add_argument("--user-audio", type=Path, help="the user's voice (default: the user video's audio)")
    parser.add_argument("--out", type=Path, required=True, help="the avatar video to write (mp4)")
    parser.add_argument("--realtime", action="store_true", help="send at wall-clock speed, like a live call")
    parser.add_argument("--block", type=int, help="frames per block (server default 10)")
    parser.add_argument("--nfe", type=int, help="sampler steps per block (server default 10)")
    parser.add_argument("--audio-guidance", type=float)
    parser.add_argument("--user-guidance", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="generate the first window from idle input, so the first frame needs one block of input, not the "
        "2 s window (default: on with --realtime, off without)",
    )
    parser.add_argument("--raw", action="store_true", help="receive RAW_RGB frames instead of JPEG")
    parser.add_argument(
        "--user-max-side", type=int, default=Limit.MAX_IMAGE_SIDE, help="downscale user frames to this side at most"
    )
    return parser


# --- inputs ---------------------------------------------------------------------------------------


def _fit_samples(samples: np.ndarray, length: int) -> np.ndarray:
    return samples[:length] if samples.shape[0] >= length else np.pad(samples, (0, length - samples.shape[0]))


def _fit_frames(frames: np.ndarray, length: int) -> np.ndarray:
    if frames.shape[0] >= length:
        return frames[:length]
    return np.concatenate([frames, np.repeat(frames[-1:], length - frames.shape[0], axis=0)])


def _downscale(frames: np.ndarray, max_side: int) -> np.ndarray:
    import cv2

    height, width = frames.shape[1:3]
    scale = max_side / max(height, width)
    if scale >= 1:
        return frames
    size = (max(Limit.MIN_IMAGE_SIDE, round(width * scale)), max(Limit.MIN_IMAGE_SIDE, round(height * scale)))
    return np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])


def load_inputs(args: argparse.Namespace) -> Inputs:
    from avatar_forcing.media.io import load_audio, read_video  # lazy: the client library loads without it

    if not Limit.MIN_IMAGE_SIDE <= args.user_max_side <= Limit.MAX_IMAGE_SIDE:
        raise ValueError(
            f"--user-max-side: got {args.user_max_side}; expected [{Limit.MIN_IMAGE_SIDE}, {Limit.MAX_IMAGE_SIDE}]"
        )
    for name in ("portrait", "avatar_audio", "user_video", "user_audio"):
        path = getattr(args, name)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{name.replace('_', '-')} {path}: file not found")
    portrait = portrait_bytes(args.portrait) if args.portrait is not None else None
    avatar_audio = load_audio(args.avatar_audio)
    if avatar_audio.size == 0:
        raise ValueError(f"--avatar-audio {args.avatar_audio}: no samples")
    num_frames = math.ceil(avatar_audio.shape[0] / Limit.SAMPLES_PER_FRAME)
    clip = read_video(args.user_video, Limit.FPS)
    user_audio = load_audio(args.user_audio) if args.user_audio is not None else clip.audio
    if user_audio is None:
        user_audio = np.zeros(0, np.float32)
    return Inputs(
        portrait=portrait,
        avatar_audio=_fit_samples(avatar_audio, num_frames * Limit.SAMPLES_PER_FRAME),
        user_frames=_downscale(_fit_frames(clip.frames, num_frames), args.user_max_side),
        user_audio=_fit_samples(user_audio, num_frames * Limit.SAMPLES_PER_FRAME),
        num_frames=num_frames,
    )


def session_options(args: argparse.Namespace) -> dict[str, Any]:
    names = ("block", "nfe", "audio_guidance", "user_guidance", "seed")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    # A live call (--realtime) must not wait for the 2 s first window before its first frame.
    warm = args.warm_start if args.warm_start is not None else args.realtime
    if warm:
        options["warm_start"] = True
    return options


# --- the session ----------------------------------------------------------------------------------


async def _send(stream: Any, inputs: Inputs, stats: Stats, realtime: bool, clock_start: float) -> None:
    for index in range(inputs.num_frames):
        if realtime:
            # A camera and a microphone have frame `index` once its 40 ms have passed: send it then
            # (the avatar's audio, produced ahead of time, goes out a second ahead).
            delay = clock_start + (index + 1) * FRAME_US / 1e6 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        stamp = index * FRAME_US
        audio = slice(index * Limit.SAMPLES_PER_FRAME, (index + 1) * Limit.SAMPLES_PER_FRAME)
        if index % AVATAR_CHUNK_FRAMES == 0:
            chunk = slice(index * Limit.SAMPLES_PER_FRAME, (index + AVATAR_CHUNK_FRAMES) * Limit.SAMPLES_PER_FRAME)
            await stream.send_avatar_audio(inputs.avatar_audio[chunk], timestamp_us=stamp)
        if stats.first_input_at is None:
            stats.first_input_at = time.monotonic()
        await stream.send_user_frame(inputs.user_frames[index], timestamp_us=stamp)
        await stream.send_user_audio(inputs.user_audio[audio], timestamp_us=stamp)
    await stream.end_input()


def _record(stats: Stats, frame: Frame, realtime: bool, clock_start: float) -> None:
    now = time.monotonic()
    stats.first_frame_at = stats.first_frame_at or now
    stats.last_frame_at = now
    stats.frames += 1
    stats.block_latency_ms.append(frame.timing.block_latency_ms)
    stats.indices.append(frame.index)
    stats.arrivals.append(now)
    stats.degradation.append(frame.timing.degradation)
    stats.nfe.append(frame.timing.nfe_used)
    if realtime:  # how long after the end of its media time the frame was here
        stats.frame_delay_ms.append((now - clock_start - (frame.index + 1) * FRAME_US / 1e6) * 1000.0)
    if frame.timing.degradation != "DEGRADATION_NONE":
        stats.degraded[frame.timing.degradation] = stats.degraded.get(frame.timing.degradation, 0) + 1


async def run_stream(
    target: str,
    token: str | None,
    inputs: Inputs,
    *,
    realtime: bool,
    out: Path | None = None,
    options: dict[str, Any] | None = None,
    avatar_id: str | None = None,
    session_id: str = "",
    output_format: int = pb.JPEG,
    credentials: Any = None,
    on_error: Any = "warn",
    stats: Stats | None = None,
) -> Stats:
    """One session: send `inputs` (paced at real time with `realtime`), receive every frame, write
    them to `out` when given; returns the statistics. The client CLI and serve-bench both run
    sessions through this function, so their pacing and figures are the same by construction.
    `stats` (optional) is filled in place, so a caller that times out still sees what arrived."""
    from avatar_forcing.media.io import VideoWriter

    stats = stats if stats is not None else Stats()
    async with AvatarClient(target, token, credentials=credentials) as client:
        session = client.session(
            inputs.portrait,
            avatar_id=avatar_id,
            options=options or {},
            session_id=session_id,
            output_format=output_format,
            on_error=on_error,
        )
        async with session as stream:
            stats.started_at = time.monotonic()
            stats.session_id = stream.session_id
            stats.size = (stream.started.width, stream.started.height)
            clock_start = stats.clock_start = time.monotonic()
            sender = asyncio.create_task(_send(stream, inputs, stats, realtime, clock_start))
            try:
                with contextlib.ExitStack() as files:
                    writer = None
                    if out is not None:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        writer = files.enter_context(VideoWriter(out, fps=Limit.FPS, has_audio=True))
                    async for frame in stream.frames():
                        _record(stats, frame, realtime, clock_start)
                        if writer is not None:
                            await asyncio.to_thread(_write, writer, frame)
                await sender
            finally:
                if not sender.done():
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await sender
    return stats


async def stream_session(args: argparse.Namespace, inputs: Inputs) -> Stats:
    """Run one session: send the inputs, write the frames to args.out; returns the statistics."""
    import grpc

    stats = Stats()

    def on_error(error: ServerError) -> None:
        stats.errors.append(error)
        print(f"server dropped a message: {error}", file=sys.stderr)

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    return await run_stream(
        args.target,
        token,
        inputs,
        realtime=args.realtime,
        out=args.out,
        options=session_options(args),
        avatar_id=args.avatar_id,
        session_id=args.session_id,
        output_format=pb.RAW_RGB if args.raw else pb.JPEG,
        credentials=grpc.ssl_channel_credentials() if args.tls else None,
        on_error=on_error,
        stats=stats,
    )


def _write(writer: Any, frame: Frame) -> None:
    writer.write(frame.image)
    writer.write_audio(frame.audio_float32())


# --- report ---------------------------------------------------------------------------------------


def _percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    p50, p95 = np.percentile(np.asarray(values, np.float64), [50, 95])
    return f"p50 {p50:.1f} ms, p95 {p95:.1f} ms"


def report(args: argparse.Namespace, inputs: Inputs, stats: Stats) -> str:
    width, height = stats.size
    lines = [
        f"wrote {args.out} ({stats.frames} of {inputs.num_frames} frames, {stats.frames / Limit.FPS:.2f} s, "
        f"{width}x{height}), session {stats.session_id}"
    ]
    if stats.first_frame_at is not None:
        first = (stats.first_frame_at - (stats.first_input_at or stats.started_at)) * 1000.0
        lines.append(
            f"first frame: {first:.0f} ms after the first input "
            f"({(stats.first_frame_at - stats.started_at) * 1000.0:.0f} ms after Started)"
        )
    lines.append(f"block latency (server): {_percentiles(stats.block_latency_ms)}")
    if stats.frame_delay_ms:
        lines.append(f"frame delay behind real time: {_percentiles(stats.frame_delay_ms)}")
    if stats.frames > 1 and stats.first_frame_at is not None and stats.last_frame_at is not None:
        span = stats.last_frame_at - stats.first_frame_at
        if span > 0:
            lines.append(f"frame rate received: {(stats.frames - 1) / span:.1f} fps")
    degraded = sum(stats.degraded.values())
    detail = " (" + ", ".join(f"{k} {v}" for k, v in sorted(stats.degraded.items())) + ")" if degraded else ""
    lines.append(f"degraded frames: {degraded} of {stats.frames}{detail}")
    if stats.errors:
        lines.append(f"messages dropped by the server: {len(stats.errors)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        inputs = load_inputs(args)
    except (ValueError, FileNotFoundError) as exc:  # includes ValidationError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        stats = asyncio.run(stream_session(args, inputs))
    except ServiceError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(report(args, inputs, stats))
    if stats.frames != inputs.num_frames:
        print(f"error: received {stats.frames} frames; expected {inputs.num_frames}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
