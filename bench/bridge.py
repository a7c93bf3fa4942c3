"""Figures of the room bridge: `python -m bench.bridge [--stack] [--seconds 20]`.

- human frame in -> avatar frame out: from a camera frame reaching the bridge to the avatar
  frame of the same media time (frame index k <-> k * 40 ms) being published in the room; p50/p95.
  With `--stack` the session is the real one (gateway -> gRPC -> Serve, tiny model, CPU); without,
  the in-process fake session (block 5, 100 ms generation), which isolates the bridge's own share.
- AV offset of published media: in the room, |capture time of a frame's video - of its audio|
  (they leave together), and for the LiveKit adapter the audio the real `rtc.AudioSource` still
  queues when the video is captured (what the audio lags the video by), measured offline.
- interruption -> listening: from `lk.clear_buffer` arriving to (a) the first published frame
  with the stale speech silenced and (b) the first published frame the session generated
  without it (index >= Interrupted.frame_index); and to `lk.playback_finished` leaving.
Real time, real clock: the figures depend on the machine (2 shared cores here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import sys
import time
import uuid
from typing import Any

import numpy as np


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def worst(values: list[float]) -> float | None:
    """The largest value; NaN (a listening frame never seen) wins, as `max` would only by chance."""
    if not values:
        return None
    return float("nan") if any(v != v for v in values) else max(values)


async def audio_source_lag(seconds: float = 3.0) -> dict[str, float]:
    """The real rtc.AudioSource (queue 100 ms) fed one 40 ms frame per 40 ms tick, as the publisher does."""
    from livekit import rtc

    from services.bridge.livekit_room import AUDIO_QUEUE_MS

    source = rtc.AudioSource(16000, 1, queue_size_ms=AUDIO_QUEUE_MS)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    queued = []
    for n in range(round(seconds * 25)):
        await asyncio.sleep(max(0.0, t0 + n * 0.04 - loop.time()))
        queued.append(source.queued_duration * 1000)
        await source.capture_frame(rtc.AudioFrame(bytes(1280), 16000, 1, 640))
    await source.aclose()
    steady = queued[25:]
    return {"audio_queue_ms_mean": statistics.fmean(steady), "audio_queue_ms_p95": pct(steady, 0.95)}


async def measure(backend: Any, order: Any, seconds: float, human_frames: Any = None) -> dict[str, Any]:
    from livekit import rtc
    from livekit.agents.voice.avatar import DataStreamAudioOutput

    from services.bridge.memory_room import MemoryServer, wait_until
    from services.bridge.protocol import PUBLISH_ON_BEHALF
    from services.bridge.runner import BridgeSession

    server = MemoryServer()
    agent = server.room(order.agent_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)
    await agent.connect()
    bridge_room = server.room(
        order.avatar_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT, **{PUBLISH_ON_BEHALF: order.agent_identity}
    )
    session = BridgeSession(bridge_room, backend, order)
    task = asyncio.create_task(session.run())
    human = server.room("human")
    await human.connect()
    camera, mic = await human.publish_camera(), await human.publish_microphone()

    async def feed() -> None:
        loop = asyncio.get_running_loop()
        t0, n = loop.time(), 0
        pixels = np.full((96, 128, 4), 128, np.uint8)
        while True:
            await asyncio.sleep(max(0.0, t0 + n * 0.04 - loop.time()))
            if human_frames is not None:
                image = human_frames[n % len(human_frames)]
                pixels = np.concatenate([image, np.full((*image.shape[:2], 1), 255, np.uint8)], axis=2)
            h, w = pixels.shape[:2]
            await camera.capture_frame(rtc.VideoFrame(w, h, rtc.VideoBufferType.RGBA, pixels.tobytes()))
            await mic.capture_frame(rtc.AudioFrame(bytes(1280), 16000, 1, 640))
            n += 1

    feeder = asyncio.create_task(feed())
    output = DataStreamAudioOutput(
        agent,
        destination_identity=order.avatar_identity,
        wait_remote_track=rtc.TrackKind.KIND_VIDEO,
        sample_rate=16000,
        wait_playback_start=True,
    )
    finished_at: list[float] = []
    loop = asyncio.get_running_loop()
    output.on("playback_finished", lambda ev: finished_at.append(loop.time()))
    await wait_until(lambda: bridge_room.published, 300)
    t_end = loop.time() + seconds
    interruptions = []
    tone = (6000 * np.sin(np.arange(16000 * 3) * 2 * np.pi * 220 / 16000)).astype(np.int16)
    while loop.time() < t_end:
        for offset in range(0, tone.shape[0], 3200):
            piece = tone[offset : offset + 3200]
            await output.capture_frame(rtc.AudioFrame(piece.tobytes(), 16000, 1, piece.shape[0]))
        output.flush()
        await wait_until(lambda: session.stats.started_sent > len(interruptions), 60)
        await asyncio.sleep(1.0)
        cleared = loop.time()
        n_published = len(bridge_room.published)
        output.clear_buffer()
        await asyncio.wait_for(output.wait_for_playout(), 10)
        reported = finished_at[-1]
        await asyncio.sleep(2.0)
        silenced = next(t for t, *_ in bridge_room.published[n_published:] if t >= cleared)
        index = session.stream.interrupted_frame_index
        listening = next((t for i, t in session.stats.published_at if index is not None and i >= index), None)
        interruptions.append(
            {
                "silenced_ms": (silenced - cleared) * 1000,
                "listening_ms": (listening - cleared) * 1000 if listening else float("nan"),
                "finished_ms": (reported - cleared) * 1000,
            }
        )
        await asyncio.sleep(1.0)
    arrivals = dict(session.stats.user_frames_at)
    latencies = [(t - arrivals[i]) * 1000 for i, t in session.stats.published_at if i in arrivals]
    av = [0.0 for _ in bridge_room.published]  # video and audio of a frame are captured in one call
    stats = session.publisher.stats
    session.stop("bench_end")
    await task
    feeder.cancel()
    return {
        "frames_published": stats.published,
        "held_frames": stats.held,
        "frame_in_to_out_ms_p50": pct(latencies, 0.5),
        "frame_in_to_out_ms_p95": pct(latencies, 0.95),
        "frame_pairs": len(latencies),
        "av_offset_in_room_ms_max": max(av) if av else float("nan"),
        "interruptions": len(interruptions),
        "clear_to_silenced_ms_p50": pct([x["silenced_ms"] for x in interruptions], 0.5),
        "clear_to_listening_ms_p50": pct([x["listening_ms"] for x in interruptions], 0.5),
        "clear_to_listening_ms_max": worst([x["listening_ms"] for x in interruptions]),
        "clear_to_listening_ms_each": [round(x["listening_ms"], 1) for x in interruptions],
        "clear_to_playback_finished_ms_p50": pct([x["finished_ms"] for x in interruptions], 0.5),
        "block": session.stream.started.block,
    }


def fake_run(seconds: float) -> dict[str, Any]:
    from services.bridge.backend import FakeBackend, JoinOrder

    order = JoinOrder("s1", "room", "memory://", "t", "t", "ava", "af-avatar-s1", agent_identity="agent")
    return asyncio.run(measure(FakeBackend(block=5, latency_s=0.1), order, seconds))


def stack_run(seconds: float, prompt_after_interrupt: bool = True) -> dict[str, Any]:
    """The real stack (tiny, CPU): gateway -> tenant, key, avatar, session; the bridge streams it."""
    import httpx

    from services.bridge.backend import GrpcBackend, JoinOrder
    from services.local.launcher import start_local
    from services.local.warmup import sample_inputs
    from services.store.inspection import delete_namespace
    from services.wire.images import portrait_bytes

    admin_token = "bench-admin-" + secrets.token_hex(24)
    prefix = f"bench-br-{uuid.uuid4().hex[:8]}"
    print("starting the tiny stack (a minute or two)...", file=sys.stderr)
    service = start_local(
        "tiny",
        grpc_port=0,
        http_port=0,
        auth_secret=secrets.token_hex(32),
        app_args={"redis_prefix": prefix, "degrade": True, "prompt_after_interrupt": prompt_after_interrupt},
        start_redis_if_down=True,
        warm=True,
        gateway_port=0,
        gateway_admin_token=admin_token,
        log=lambda message: None,
    )
    try:
        inputs = sample_inputs(frames=100)
        admin = {"Authorization": f"Bearer {admin_token}"}
        with httpx.Client(base_url=service.gateway.url, timeout=120) as c:
            c.post("/v1/tenants", json={"tenant_id": "bench"}, headers=admin).raise_for_status()
            key = c.post("/v1/tenants/bench/keys", json={"name": "b"}, headers=admin).json()["api_key"]
            headers = {"Authorization": f"Bearer {key}"}
            portrait = inputs.portrait if isinstance(inputs.portrait, bytes) else portrait_bytes(inputs.portrait)
            files = {"portrait": ("p.png", portrait, "image/png")}
            c.post("/v1/avatars", files=files, data={"avatar_id": "ava"}, headers=headers).raise_for_status()
            created = c.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers).json()
        order = JoinOrder(
            created["session_id"],
            "room",
            "memory://",
            "t",
            created["session_token"],
            "ava",
            f"af-avatar-{created['session_id']}",
            agent_identity="agent",
            grpc_target=created["grpc_target"],
        )
        return asyncio.run(measure(GrpcBackend(start_timeout_s=120.0), order, seconds, inputs.user_frames))
    finally:
        try:
            delete_namespace(service.redis_url, prefix)
        finally:
            service.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bridge", description=__doc__.split("\n")[0])
    parser.add_argument("--stack", action="store_true", help="the real stack (tiny, CPU) instead of the fake session")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--wait-after-interrupt", action="store_true",
        help="with --stack: the ingress waits for the media of the block after an Interrupt (the old schedule)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    started = time.monotonic()
    if args.stack:
        figures = stack_run(args.seconds, prompt_after_interrupt=not args.wait_after_interrupt)
        figures["prompt_after_interrupt"] = not args.wait_after_interrupt
    else:
        figures = fake_run(args.seconds)
    figures.update(asyncio.run(audio_source_lag()))
    figures["backend"] = "stack (tiny, CPU)" if args.stack else "fake (block 5, 100 ms)"
    figures["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
