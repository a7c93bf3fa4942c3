"""One session measured on the client path: an `AvatarSession.Stream` fed with the sample media at
real time through the proxy, and what it delivered - frame indices, FrameTiming latencies, the
degradation per frame, arrival times - with the per-block figures derived from them."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

from bench.media import BLOCK, FRAME_S, FRAME_US, Media


@dataclass
class SessionResult:
    """What one AvatarSession.Stream delivered."""

    name: str
    frames_sent: int  # media frames sent (each: 640 avatar samples, 640 user samples, 1 camera frame)
    started: bool = False
    session_id: str = ""
    indices: list[int] = field(default_factory=list)  # frame_index of every frame received, in order
    latency_ms: list[float] = field(default_factory=list)  # FrameTiming.block_latency_ms per frame
    degradation: list[str] = field(default_factory=list)  # per frame
    nfe: list[int] = field(default_factory=list)  # per frame
    lag_ms: list[float] = field(default_factory=list)  # arrival - end of the frame's media time (= its send)
    arrivals: list[float] = field(default_factory=list)  # monotonic time each frame was received
    send_start: float = 0.0  # monotonic start of the media clock (frame i is sent at + 40 ms (i + 1))
    last_frame_at: float = 0.0
    error: str = ""

    @property
    def continuous(self) -> bool:
        """Every frame 0 .. frames_sent - 1 arrived once, in order."""
        return self.indices == list(range(self.frames_sent))

    def block_latencies(self) -> list[float]:
        """One latency per block (a block's frames share their FrameTiming)."""
        return [latency for _, latency in self.blocks()]

    def blocks(self) -> list[tuple[float, float]]:
        """(monotonic arrival of the block's first frame, its FrameTiming.block_latency_ms) per block."""
        firsts: dict[int, tuple[float, float]] = {}
        for index, at, latency in zip(self.indices, self.arrivals, self.latency_ms, strict=True):
            firsts.setdefault(index // BLOCK, (at, latency))
        return list(firsts.values())

    def client_block_latencies(self) -> list[float]:
        """Per block, measured by the client: arrival of the block's last frame minus the moment its
        last media was sent (the end of that frame's media time, pacing being real time)."""
        last: dict[int, float] = {}
        for index, lag in zip(self.indices, self.lag_ms, strict=True):
            last[index // BLOCK] = lag
        return list(last.values())

    def degraded_frames(self) -> int:
        return sum(1 for d in self.degradation if d != "DEGRADATION_NONE")

    def frames_per_s(self) -> float:
        """Frames delivered per second of the session's wall time (first media sent to last frame)."""
        elapsed = self.last_frame_at - self.send_start
        return len(self.indices) / elapsed if elapsed > 0 else float("nan")


async def paced_session(
    target: str,
    token: str,
    media: Media,
    frames: int,
    *,
    name: str = "session",
    media_offset: int = 0,
    seed: int = 1,
    timeout_s: float | None = None,
    options: dict[str, Any] | None = None,
) -> SessionResult:
    """One session fed at real time: every 40 ms one avatar chunk (640 samples), one user chunk
    and one camera frame (JPEG), each sent at the end of its media time (as a microphone and a
    camera deliver them), then EndOfInput; reads every frame to the end of the stream.
    Never raises: failures are in `SessionResult.error`. Bounded by `timeout_s`."""
    from services.client.session import AvatarClient
    from services.wire.protos import pb

    result = SessionResult(name, frames)
    timeout_s = timeout_s if timeout_s is not None else frames * FRAME_S + 60.0
    options = {"warm_start": True, "seed": seed, **(options or {})}

    async def run() -> None:
        async with (
            AvatarClient(target, token) as client,
            client.session(media.portrait, options=options, output_format=pb.JPEG, on_error="ignore") as stream,
        ):
            result.started = True
            result.session_id = stream.session_id
            clock = time.monotonic()
            result.send_start = clock

            async def send() -> None:
                for index in range(frames):
                    # A live source has frame `index` once its 40 ms have passed: send it then.
                    delay = clock + (index + 1) * FRAME_S - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    stamp = index * FRAME_US
                    source = media_offset + index
                    await stream.send_avatar_audio(media.avatar_chunk(source), timestamp_us=stamp)
                    await stream.send_user_audio(media.user_chunk(source), timestamp_us=stamp)
                    await stream.send_user_frame(media.camera_jpeg(source), timestamp_us=stamp)
                await stream.end_input()

            sender = asyncio.create_task(send())
            try:
                async for frame in stream.frames():
                    now = time.monotonic()
                    result.indices.append(frame.index)
                    result.latency_ms.append(frame.timing.block_latency_ms)
                    result.degradation.append(frame.timing.degradation)
                    result.nfe.append(frame.timing.nfe_used)
                    result.lag_ms.append((now - clock - (frame.index + 1) * FRAME_S) * 1000.0)
                    result.arrivals.append(now)
                    result.last_frame_at = now
                await sender
            finally:
                if not sender.done():
                    sender.cancel()
                    with contextlib.suppress(BaseException):
                        await sender

    try:
        await asyncio.wait_for(run(), timeout_s)
    except TimeoutError:
        result.error = f"timed out after {timeout_s:.0f} s"
    except Exception as exc:  # reported, never raised: a load run must finish and report
        result.error = f"{type(exc).__name__}: {exc}"
    return result
