"""The launcher's readiness probe: real sessions through Serve's gRPC proxy before `serve` says
it is ready.

A deployment that answers its health check has not yet run its model: the first real calls pay
torch's first-run costs (kernel selection, allocator growth, lazy module state), the ingress's
first deployment-handle calls (router and replica discovery) and the proxy's first stream. On a
2-core machine that made the first session's blocks late for seconds and the real-time policy
degraded or dropped them (first frame 4.9 s, p95 2.8 s, 80 of 189 frames degraded on the first
client run after `ready`, against 0.27 s / 0.83 s / 20 on the third). The probe runs the sample
media through the same client code path `avatar-forcing client` uses (`services.client.cli.run_stream`),
with several sessions at once so that the generator's cross-session batches are warmed too.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

from services.local.defaults import REPO_ROOT
from services.local.errors import LauncherError, Log

SAMPLES_DIR = REPO_ROOT / "samples"
WARMUP_TENANT = "warmup"
WARMUP_FRAMES = 60  # 2.4 s of media: the warm-started first window plus six blocks
WARMUP_SESSIONS = 2  # concurrent: batch sizes 1 and 2 of the generator both run once
WARMUP_TIMEOUT_S = 180.0


def sample_inputs(samples_dir: Path = SAMPLES_DIR, frames: int = WARMUP_FRAMES) -> Any | None:
    """The repository's sample media as client inputs cut to `frames`; None when they are missing
    (an installed package without the repository's samples/)."""
    from services.client.cli import Inputs, load_inputs

    paths = {name: samples_dir / name for name in ("portrait.png", "avatar_speech.wav", "user.mp4")}
    if not all(path.is_file() for path in paths.values()):
        return None
    from services.wire.protos import Limit

    class _Args:  # the options load_inputs reads
        portrait = paths["portrait.png"]
        avatar_audio = paths["avatar_speech.wav"]
        user_video = paths["user.mp4"]
        user_audio = None
        user_max_side = Limit.MAX_IMAGE_SIDE

    full = load_inputs(_Args())
    frames = min(frames, full.num_frames)
    samples = frames * Limit.SAMPLES_PER_FRAME
    return Inputs(
        portrait=full.portrait,
        avatar_audio=full.avatar_audio[:samples],
        user_frames=full.user_frames[:frames],
        user_audio=full.user_audio[:samples],
        num_frames=frames,
    )


async def _sessions(target: str, token: str, inputs: Any, sessions: int) -> list[Any]:
    from services.client.cli import run_stream

    # Paced at real time, as the user's client sends: the ingress then schedules blocks one by one
    # (as it will for a live call) instead of holding a flood of backlogged ones.
    runs = [
        run_stream(target, token, inputs, realtime=True, options={"warm_start": True, "seed": k}, on_error="ignore")
        for k in range(sessions)
    ]
    return await asyncio.wait_for(asyncio.gather(*runs), WARMUP_TIMEOUT_S)


def _run_in_thread(coroutine_factory: Any) -> Any:
    """asyncio.run in a thread of its own: start_local may be called with an event loop running."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coroutine_factory())
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="avatar-forcing-warmup", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def warm_up(target: str, token: str, log: Log, *, sessions: int = WARMUP_SESSIONS, inputs: Any = None) -> float:
    """Run `sessions` short real sessions through the proxy at `target`; returns the seconds it took
    (0 when the sample media are missing: nothing to send, logged). A failed session is a start-up
    failure: a service that cannot stream its own samples is not ready."""
    inputs = inputs if inputs is not None else sample_inputs()
    if inputs is None:
        log(f"warm-up: skipped (no sample media in {SAMPLES_DIR}); the first session pays first-call costs")
        return 0.0
    log(f"warm-up: {sessions} sessions of {inputs.num_frames / 25:.1f} s through the gRPC proxy")
    began = time.monotonic()
    try:
        # One session alone first (its late blocks are not held behind a second session's), then
        # `sessions` at once for the batched paths.
        results = _run_in_thread(lambda: _sessions(target, token, inputs, 1))
        if sessions > 1:
            results += _run_in_thread(lambda: _sessions(target, token, inputs, sessions))
    except Exception as exc:
        raise LauncherError(f"warm-up session failed: {type(exc).__name__}: {exc}") from None
    for stats in results:
        if stats.frames != inputs.num_frames:
            raise LauncherError(f"warm-up session returned {stats.frames} of {inputs.num_frames} frames")
    took = time.monotonic() - began
    log(f"warm-up: done in {took:.1f} s")
    return took
