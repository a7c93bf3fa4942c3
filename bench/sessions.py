"""One session measured on the client path: an `AvatarSession.Stream` fed with the sample media at
real time through the proxy by the client CLI's own streaming function, and what it delivered -
frame indices, FrameTiming latencies, the degradation per frame, arrival times - with the per-block
figures derived from them."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from avatar_forcing.config import SAMPLES_PER_FRAME
from bench.media import BLOCK, FRAME_S, Media


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
    first_frame_ms: float = float("nan")  # first frame received minus the first media sent
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


def client_inputs(media: Media, frames: int, media_offset: int = 0) -> Any:
    """The sample media, looped from `media_offset`, as the client CLI's `Inputs` (float audio,
    RGB camera frames): what `avatar-forcing client` sends for these samples."""
    import numpy as np

    from services.client.cli import Inputs

    samples = np.arange(frames * SAMPLES_PER_FRAME) + media_offset * SAMPLES_PER_FRAME
    camera = (np.arange(frames) + media_offset) % media.frames.shape[0]
    return Inputs(
        portrait=media.portrait,
        avatar_audio=media.speech[samples % media.speech.shape[0]].astype(np.float32) / 32767.0,
        user_frames=media.frames[camera],
        user_audio=media.user_audio[samples % media.user_audio.shape[0]].astype(np.float32) / 32767.0,
        num_frames=frames,
    )


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
    """One session exactly as `avatar-forcing client --realtime` runs it: the client CLI's own
    streaming function (`services.client.cli.run_stream`: its pacing - each camera frame and
    microphone slice at the end of its 40 ms, the avatar audio a second ahead - its warm start,
    JPEG output), fed with the sample media; reads every frame to the end of the stream.
    Never raises: failures are in `SessionResult.error`. Bounded by `timeout_s`."""
    from services.client.cli import Stats, run_stream

    result = SessionResult(name, frames)
    timeout_s = timeout_s if timeout_s is not None else frames * FRAME_S + 60.0
    # The client CLI's options with --realtime and --seed: warm start on (its --realtime default).
    options = {"warm_start": True, "seed": seed, **(options or {})}
    inputs = client_inputs(media, frames, media_offset)
    stats = Stats()
    try:
        await asyncio.wait_for(
            run_stream(target, token, inputs, realtime=True, options=options, on_error="ignore", stats=stats),
            timeout_s,
        )
    except TimeoutError:
        result.error = f"timed out after {timeout_s:.0f} s"
    except Exception as exc:  # reported, never raised: a load run must finish and report
        result.error = f"{type(exc).__name__}: {exc}"
    result.started = bool(stats.session_id)
    result.session_id = stats.session_id
    result.send_start = stats.clock_start
    result.indices = list(stats.indices)
    result.latency_ms = list(stats.block_latency_ms)
    result.degradation = list(stats.degradation)
    result.nfe = list(stats.nfe)
    result.lag_ms = list(stats.frame_delay_ms)
    result.arrivals = list(stats.arrivals)
    result.last_frame_at = stats.last_frame_at or 0.0
    if stats.first_frame_at is not None:
        result.first_frame_ms = (stats.first_frame_at - (stats.first_input_at or stats.started_at)) * 1000.0
    return result
