"""`avatar-forcing serve-bench`: the serving stack measured through Ray Serve's gRPC proxy.

Starts a local stack (Redis, a local Ray, Serve's gRPC proxy, the application with the
real-time policy ON; tiny model by default), then prints markdown tables of:

1. per-stage latency p50/p95 of one block (10 frames) with real request sizes, each RPC sent
   through the proxy to the session ingress, which forwards it to the stage's deployment;
   and the end-to-end block latency (FrameTiming.block_latency_ms) of one AvatarSession.Stream
   fed with the sample media at real time;
2. concurrent real-time sessions: N = 1, 2, 3, ... sessions paced at real time for
   `--session-s` seconds each step: frames/s delivered per session, block latency p50/p95,
   fraction of degraded frames; the largest N that sustains real time on this machine;
3. the cross-session batching gain of the generator: blocks/s of B sessions' GenerateBlock
   calls at once (serve.batch) against one at a time, at the service level (tiny) and at the
   library level (`BlockSampler.run([r1..rB])` against B calls of `run([ri])`, tiny and paper).

    avatar-forcing serve-bench                      # everything, < 6 min on a 2-core CPU box
    avatar-forcing serve-bench --max-sessions 3 --session-s 10 --skip-library

Everything runs on loopback. Timings on a shared CPU are noisy: read the ratios, not the
absolute values. The load test (tests/integration/test_load.py) uses the same stack helpers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import secrets
import shlex
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from services.local.launcher import REPO_ROOT, LocalService, start_local

SAMPLES_DIR = REPO_ROOT / "samples"
APP_NAME = "avatar_forcing_bench"
UNBATCHED_APP = "avatar_forcing_bench_unbatched"
FPS = 25
SAMPLES_PER_FRAME = 640
FRAME_S = 1.0 / FPS
BLOCK = 10
DEFAULT_BUDGET_S = 0.8  # services.ingress.pipeline.IngressSettings.latency_budget_s
SUSTAINED_MAX_DEGRADED = 0.05  # "real-time sustained": p95 < budget and < 5 % degraded frames

Log = Callable[[str], None]


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- media ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Media:
    """The sample media as a client sends it: 640-sample chunks and JPEG camera frames, looped."""

    portrait: bytes  # PNG bytes
    speech: np.ndarray  # (N,) int16, the avatar's audio
    user_audio: np.ndarray  # (M,) int16, the user's microphone
    camera: list[bytes]  # JPEG bytes of each 25 fps camera frame
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB camera frames

    def avatar_chunk(self, index: int) -> np.ndarray:
        return _looped(self.speech, index)

    def user_chunk(self, index: int) -> np.ndarray:
        return _looped(self.user_audio, index)

    def camera_jpeg(self, index: int) -> bytes:
        return self.camera[index % len(self.camera)]


def _looped(samples: np.ndarray, frame: int) -> np.ndarray:
    """Samples [640 frame, 640 (frame + 1)) of `samples` repeated end to end."""
    positions = (np.arange(SAMPLES_PER_FRAME) + frame * SAMPLES_PER_FRAME) % samples.shape[0]
    return samples[positions]


def load_media(samples_dir: Path = SAMPLES_DIR) -> Media:
    from avatar_forcing.media.io import load_audio, read_video

    clip = read_video(samples_dir / "user.mp4")
    speech = (np.clip(load_audio(samples_dir / "avatar_speech.wav"), -1, 1) * 32767).astype(np.int16)
    user = (np.clip(clip.audio, -1, 1) * 32767).astype(np.int16)
    camera = []
    for frame in clip.frames:
        ok, data = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        if not ok:  # pragma: no cover - OpenCV encodes any uint8 RGB image
            raise RuntimeError("OpenCV could not encode a camera frame")
        camera.append(data.tobytes())
    return Media((samples_dir / "portrait.png").read_bytes(), speech, user, camera, clip.frames)


# --- the stack --------------------------------------------------------------------------------------


@dataclass
class BenchStack:
    """A running local stack (`services.launcher.start_local`) with this benchmark's Redis prefix."""

    service: LocalService
    prefix: str  # every Redis key of this stack starts with it
    config: str
    degrade: bool
    latency_budget_s: float
    generator_replicas: int
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        return self.service.grpc_target  # Serve's gRPC proxy, 127.0.0.1:port

    @property
    def redis_url(self) -> str:
        return self.service.redis_url

    def token(self, tenant: str = "bench", ttl_s: float = 3600.0) -> str:
        return self.service.mint_token(tenant, ttl_s)

    def metadata(self, tenant: str = "bench") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(tenant)}"),)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            with contextlib.suppress(Exception):
                delete_prefix(self.redis_url, self.prefix)
        finally:
            with _stdout_to_stderr():  # Ray's shutdown chatter goes to fd 1; keep stdout for the tables
                self.service.stop()

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def _stdout_to_stderr():
    """File descriptor 1 points at stderr for the block (output of Ray's C++ core included)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreters): nothing to redirect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def start_stack(
    config: str = "tiny",
    *,
    generator_replicas: int = 1,
    degrade: bool = True,
    latency_budget_s: float = DEFAULT_BUDGET_S,
    redis_url: str | None = None,
    prefix: str | None = None,
    num_cpus: int = 4,
    env: dict[str, str] | None = None,
    app_args: dict[str, Any] | None = None,
    log: Log = _log,
) -> BenchStack:
    """`start_local` on free loopback ports with a private Redis prefix and a fresh secret; Redis is
    the URL's, else a private redis-server."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("start_stack: Ray is already initialised in this process; it starts its own")
    prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}"
    with _stdout_to_stderr():
        service = start_local(
            config,
            grpc_port=0,
            http_port=0,
            redis_url=redis_url,
            num_cpus=num_cpus,
            auth_secret=secrets.token_hex(32),
            app_args={
                "redis_prefix": prefix,
                "degrade": degrade,
                "latency_budget_s": latency_budget_s,
                "generator_replicas": generator_replicas,
                **(app_args or {}),
            },
            env=env,
            start_redis_if_down=True,
            log=log,
        )
    return BenchStack(service, prefix, config, degrade, latency_budget_s, generator_replicas)


# --- Redis and generator leak checks -------------------------------------------------------------------


def _redis(url: str):
    import redis

    return redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)


def session_keys(redis_url: str, prefix: str) -> dict[str, list[str]]:
    """Keys that must be gone once every session has ended, by kind (empty lists: nothing leaked).

    Kept on purpose, hence not listed: avatar portraits (`P:tenant:{t}:avatar:{a}`, durable),
    replica liveness (`P:replica:{r}:alive`, `P:replicas`) while the replicas run.
    """
    client = _redis(redis_url)
    try:
        found: dict[str, list[str]] = {
            "session": [],
            "history": [],
            "state": [],
            "heartbeat": [],
            "deadline index": [],
            "tenant index": [],
            "replica sessions": [],
        }
        for raw in client.scan_iter(match=f"{prefix}:*", count=1000):
            key = raw.decode()
            rest = key[len(prefix) + 1 :]
            if rest == "session-deadlines":
                found["deadline index"] += [f"{key} -> {m.decode()}" for m in client.zrange(key, 0, -1)]
            elif rest.startswith("session:"):
                kind = rest.rsplit(":", 1)[-1] if rest.count(":") >= 2 else "session"
                found[kind if kind in found else "session"].append(key)
            elif rest.startswith("tenant:") and rest.endswith(":sessions"):
                found["tenant index"] += [f"{key} -> {m.decode()}" for m in client.smembers(key)]
            elif rest.startswith("replica:") and rest.endswith(":sessions"):
                found["replica sessions"] += [f"{key} -> {m.decode()}" for m in client.smembers(key)]
        return found
    finally:
        client.close()


def delete_prefix(redis_url: str, prefix: str) -> int:
    """Delete every key of this prefix (the stack's private namespace); returns how many."""
    client = _redis(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
        return len(keys)
    finally:
        client.close()


def generator_replica_stats(timeout_s: float = 10.0) -> dict[str, dict]:
    """`record_routing_stats()` of every live generator replica actor: sessions, cache_bytes, full."""
    import ray

    stats = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if "generator" not in name or "SERVE_REPLICA" not in name:
            continue
        handle = ray.get_actor(name, namespace=actor["namespace"])
        stats[name] = ray.get(handle.record_routing_stats.remote(), timeout=timeout_s)
    return stats


# --- statistics ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q)) if len(values) else float("nan")


def p50_p95(values: Sequence[float]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 95)


def _fmt(value: float, digits: int = 1) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"  # NaN: no data


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- one streaming session, paced at real time ------------------------------------------------------------


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
                    stamp = index * 40_000
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


# --- 1. per-stage latency ------------------------------------------------------------------------------


@dataclass
class StageFigure:
    name: str
    request_bytes: int
    response_bytes: int
    ms: list[float]


async def _timed_calls(call: Callable[[], Awaitable[Any]], repeats: int, warmup: int) -> tuple[list[float], Any]:
    last = None
    for _ in range(warmup):
        last = await call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        last = await call()
        times.append((time.perf_counter() - start) * 1000.0)
    return times, last


async def measure_stages(stack: BenchStack, media: Media, repeats: int = 30, warmup: int = 3) -> list[StageFigure]:
    """Each stage's RPC for one block of 10 frames, through Serve's gRPC proxy (-> ingress -> stage)."""
    import grpc

    from avatar_forcing.config import preset
    from avatar_forcing.media.face_crop import FaceCropper, FaceTrack
    from services.wire.protos import Limit, grpc_options, pb, pb_grpc
    from services.wire.tensors import encode

    tenant, sid = "bench", f"stages-{uuid.uuid4().hex[:8]}"
    md = stack.metadata(tenant)
    size = preset(stack.config).motion_autoencoder.image_size
    left_frames = 100  # 4 s of left context
    first = left_frames
    window = np.concatenate([media.avatar_chunk(i) for i in range(first + BLOCK)]).astype(np.float32) / 32768.0
    user_window = np.concatenate([media.user_chunk(i) for i in range(first + BLOCK)]).astype(np.float32) / 32768.0
    crops = FaceTrack(FaceCropper(size)).crops(media.frames[first : first + BLOCK], "user camera")
    figures: list[StageFigure] = []

    def extract(samples: np.ndarray, source: int) -> pb.ExtractFeaturesRequest:
        return pb.ExtractFeaturesRequest(
            session_id=sid,
            tenant_id=tenant,
            source=source,
            samples=encode(samples, "samples"),
            sample_rate=16000,
            first_frame=first,
            num_frames=BLOCK,
            left_context_samples=left_frames * SAMPLES_PER_FRAME,
        )

    async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
        audio = pb_grpc.AudioFeaturesStub(channel)
        motion = pb_grpc.MotionEncoderStub(channel)
        generator = pb_grpc.MotionGeneratorStub(channel)
        decoder = pb_grpc.FrameDecoderStub(channel)

        async def stage(name: str, method: Any, request: Any, n: int = repeats) -> Any:
            ms, response = await _timed_calls(lambda: method(request, metadata=md, timeout=60), n, warmup)
            figures.append(StageFigure(name, request.ByteSize(), response.ByteSize(), ms))
            return response

        avatar_request = extract(window, pb.AVATAR)
        avatar_features = await stage("AudioFeatures.Extract (4 s context + 10 frames)", audio.Extract, avatar_request)
        user_features = await audio.Extract(extract(user_window, pb.USER), metadata=md, timeout=60)
        motion_request = pb.EncodeUserMotionRequest(
            session_id=sid,
            tenant_id=tenant,
            first_frame=first,
            crops=encode(crops, "crops", max_bytes=Limit.MAX_CROPS_TENSOR_BYTES),
        )
        label = f"MotionEncoder.EncodeUserMotion (10 crops {size}x{size})"
        user_motion = await stage(label, motion.EncodeUserMotion, motion_request)
        portrait = await stage(
            "MotionEncoder.EncodePortrait (once per session)",
            motion.EncodePortrait,
            pb.EncodePortraitRequest(tenant_id=tenant, image=media.portrait),
            n=max(5, repeats // 3),
        )

        await generator.OpenSession(
            pb.OpenSessionRequest(
                session_id=sid,
                tenant_id=tenant,
                avatar_id=portrait.avatar_id,
                options=pb.SessionOptions(warm_start=True, seed=1),
                reference_motion=portrait.reference_motion,
            ),
            metadata=md,
            timeout=60,
        )
        cursor = 0
        latents = None
        try:
            for label, max_nfe, hold, n in (
                ("MotionGenerator.GenerateBlock (10 frames, nfe 10)", 0, False, repeats),
                ("MotionGenerator.GenerateBlock (REDUCED_NFE: nfe 5)", 5, False, max(5, repeats // 3)),
                ("MotionGenerator.GenerateBlock (HELD_FRAME: hold)", 0, True, max(5, repeats // 3)),
            ):
                times = []
                request = None
                for i in range(warmup + n):
                    request = pb.GenerateBlockRequest(
                        session_id=sid,
                        tenant_id=tenant,
                        first_frame=cursor,
                        avatar_audio=avatar_features.features,
                        user_audio=user_features.features,
                        user_motion=user_motion.latents,
                        max_nfe=max_nfe,
                        hold=hold,
                    )
                    start = time.perf_counter()
                    response = await generator.GenerateBlock(request, metadata=md, timeout=60)
                    elapsed = (time.perf_counter() - start) * 1000.0
                    cursor = response.next_input_frame
                    if i >= warmup:
                        times.append(elapsed)
                    if not hold:
                        latents = response.latents
                figures.append(StageFigure(label, request.ByteSize(), response.ByteSize(), times))
        finally:
            await generator.CloseSession(pb.CloseSessionRequest(session_id=sid, tenant_id=tenant), metadata=md)

        for label, image_format in (("RAW_RGB", pb.RAW_RGB), ("JPEG", pb.JPEG)):
            await stage(
                f"FrameDecoder.Decode (10 latents -> {label} {size}x{size})",
                decoder.Decode,
                pb.DecodeRequest(
                    session_id=sid,
                    tenant_id=tenant,
                    avatar_id=portrait.avatar_id,
                    latents=latents,
                    first_frame=0,
                    format=image_format,
                ),
            )
    return figures


def stage_table(figures: list[StageFigure], e2e: SessionResult | None) -> str:
    rows = []
    for f in figures:
        p50, p95 = p50_p95(f.ms)
        rows.append([f.name, len(f.ms), f"{f.request_bytes:,}", f"{f.response_bytes:,}", _fmt(p50), _fmt(p95)])
    if e2e is not None:
        blocks = e2e.block_latencies()
        p50, p95 = p50_p95(blocks)
        label = f"end to end: AvatarSession.Stream block latency ({e2e.frames_sent} frames at 25 fps)"
        rows.append([label, f"{len(blocks)} blocks", "", "", _fmt(p50), _fmt(p95)])
    return table(["stage (through Serve's gRPC proxy)", "calls", "request B", "response B", "p50 ms", "p95 ms"], rows)


# --- 2. concurrent real-time sessions -------------------------------------------------------------------


@dataclass
class ConcurrencyStep:
    sessions: int
    results: list[SessionResult]
    wall_s: float

    def ok(self) -> bool:
        return all(r.started and not r.error and r.continuous for r in self.results)

    def latencies(self) -> list[float]:
        return [latency for r in self.results for latency in r.block_latencies()]

    def degraded_fraction(self) -> float:
        frames = sum(len(r.indices) for r in self.results)
        return sum(r.degraded_frames() for r in self.results) / frames if frames else float("nan")

    def sustained(self, budget_s: float) -> bool:
        p95 = percentile(self.latencies(), 95)
        return self.ok() and p95 < budget_s * 1000.0 and self.degraded_fraction() < SUSTAINED_MAX_DEGRADED


async def run_concurrent(
    stack: BenchStack, media: Media, sessions: int, frames: int, *, tenant: str = "bench", stagger_s: float = 0.4
) -> ConcurrencyStep:
    """`sessions` paced sessions at once, started `stagger_s / sessions` apart (block edges not aligned)."""

    async def one(k: int) -> SessionResult:
        await asyncio.sleep(k * stagger_s / sessions)
        return await paced_session(
            stack.target, stack.token(tenant), media, frames, name=f"s{k}", media_offset=37 * k, seed=k + 1
        )

    start = time.monotonic()
    results = await asyncio.gather(*(one(k) for k in range(sessions)))
    return ConcurrencyStep(sessions, list(results), time.monotonic() - start)


def concurrency_table(steps: list[ConcurrencyStep], budget_s: float) -> str:
    rows = []
    for step in steps:
        p50, p95 = p50_p95(step.latencies())
        rates = [r.frames_per_s() for r in step.results]
        held = sum(r.degradation.count("HELD_FRAME") for r in step.results)
        reduced = sum(r.degradation.count("REDUCED_NFE") for r in step.results)
        frames = sum(len(r.indices) for r in step.results)
        client50, client95 = p50_p95([x for r in step.results for x in r.client_block_latencies()])
        errors = sum(1 for r in step.results if r.error or not r.continuous)
        rows.append(
            [
                step.sessions,
                f"{min(rates):.1f} / {statistics.mean(rates):.1f}" if rates else "n/a",
                _fmt(p50, 0),
                _fmt(p95, 0),
                f"{100 * step.degraded_fraction():.1f} % ({reduced} R, {held} H)",
                f"{_fmt(client50, 0)} / {_fmt(client95, 0)}",
                f"{frames}" + (f" ({errors} failed)" if errors else ""),
                "yes" if step.sustained(budget_s) else "no",
            ]
        )
    return table(
        [
            "sessions N",
            "frames/s per session (min / mean)",
            "block p50 ms (FrameTiming)",
            "block p95 ms (FrameTiming)",
            "degraded frames (R reduced-NFE, H held)",
            "client-side block latency p50 / p95 ms",
            "frames",
            "real time sustained",
        ],
        rows,
    )


# --- 3. cross-session batching --------------------------------------------------------------------------


@dataclass
class BatchFigure:
    level: str  # "library" or "service"
    config: str
    batch: int
    how: str  # what the one-at-a-time baseline is
    batched_blocks_s: float
    single_blocks_s: float

    @property
    def ratio(self) -> float:
        return self.batched_blocks_s / self.single_blocks_s


def library_batching(config: str, batch: int, repeats: int, threads: int) -> BatchFigure:
    """`BlockSampler.run([r1..rB])` against B calls of `run([ri])`: same-shape streaming blocks
    (after the warm start: 2 context + 10 new frames, a full cache), nfe 10, `threads` torch threads."""
    import torch

    from avatar_forcing.config import preset
    from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
    from avatar_forcing.nn.flow_transformer import FlowTransformer
    from avatar_forcing.sampling.block_sampler import BlockSampler

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            sampler = BlockSampler(FlowTransformer(preset(config).flow).eval())
            dim = sampler.model.config.motion_dim
            # One warm-started stream (its first window at nfe 2: the cache's shape does not depend
            # on it), copied B times; each copy gets its own conditions for its next block.
            base = MotionStream(sampler, torch.randn(dim) * 0.3, StreamOptions(warm_start=True, nfe=2), seed=0)
            blob = base.to_bytes()
            requests = []
            for i in range(batch):
                stream = MotionStream.from_bytes(sampler, blob)
                stream.push(*(torch.randn(BLOCK, dim) for _ in range(3)))
                request = stream.next_request(nfe=10)
                request.noise = torch.randn(request.noise.shape, generator=torch.Generator().manual_seed(i))
                requests.append(request)
        keys = {r.batch_key() for r in requests}
        assert len(keys) == 1, keys  # one shape: one forward pass per step for all of them
        sampler.run(requests)  # warm-up
        sampler.run(requests[:1])
        batched, single = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            sampler.run(requests)
            batched.append(time.perf_counter() - start)
            start = time.perf_counter()
            for request in requests:
                sampler.run([request])
            single.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return BatchFigure(
        "library",
        config,
        batch,
        f"{batch} x run([ri]), {threads} thread(s), best of {repeats}",
        batch / min(batched),
        batch / min(single),
    )


async def _open_sessions(stack: BenchStack, count: int, tenant: str) -> list[str]:
    import grpc
    import torch

    from services.wire.protos import grpc_options, pb, pb_grpc
    from services.wire.tensors import encode

    ids = [f"batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
        stub = pb_grpc.MotionGeneratorStub(channel)
        for i, sid in enumerate(ids):
            await stub.OpenSession(
                pb.OpenSessionRequest(
                    session_id=sid,
                    tenant_id=tenant,
                    avatar_id="bench",
                    options=pb.SessionOptions(warm_start=True, seed=i),
                    reference_motion=encode(0.3 * torch.ones(512), "reference_motion"),
                ),
                metadata=stack.metadata(tenant),
                timeout=60,
            )
    return ids


def _block_request(sid: str, tenant: str, first: int, seed: int):
    import torch

    from services.wire.protos import pb
    from services.wire.tensors import encode

    g = torch.Generator().manual_seed(seed)
    features = {
        n: encode(torch.randn(BLOCK, 512, generator=g), n) for n in ("avatar_audio", "user_audio", "user_motion")
    }
    return pb.GenerateBlockRequest(session_id=sid, tenant_id=tenant, first_frame=first, **features)


async def _rounds(
    cursors: dict[str, int], call: Callable[[Any], Awaitable[Any]], tenant: str, rounds: int, concurrent: bool
) -> float:
    """Blocks per second of `rounds` rounds, each one block of every session (session id -> its next
    input frame, updated): all at once or in turn."""
    ids = list(cursors)

    async def block(sid: str, r: int) -> None:
        response = await call(_block_request(sid, tenant, cursors[sid], r))
        cursors[sid] = response.next_input_frame

    async def one_round(r: int) -> None:
        if concurrent:
            await asyncio.gather(*(block(sid, r) for sid in ids))
        else:
            for sid in ids:
                await block(sid, r)

    await one_round(0)  # warm-up
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        await one_round(r)
    return len(ids) * rounds / (time.perf_counter() - start)


async def service_batching_proxy(stack: BenchStack, batch: int, rounds: int, repeats: int = 3) -> BatchFigure:
    """Through the gRPC proxy: B sessions' GenerateBlock calls at once (batched by serve.batch on
    the one generator replica) against the same calls one after the other; the two alternate
    `repeats` times, best of each."""
    import grpc

    from services.wire.protos import grpc_options, pb_grpc

    tenant = "bench"
    ids = await _open_sessions(stack, batch, tenant)
    md = stack.metadata(tenant)
    concurrent, sequential = [], []
    try:
        async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
            stub = pb_grpc.MotionGeneratorStub(channel)

            async def call(request):
                return await stub.GenerateBlock(request, metadata=md, timeout=60)

            cursors = dict.fromkeys(ids, 0)
            for _ in range(repeats):
                concurrent.append(await _rounds(cursors, call, tenant, rounds, True))
                sequential.append(await _rounds(cursors, call, tenant, rounds, False))
    finally:
        await _close_sessions(stack, ids, tenant)
    return BatchFigure(
        "service (gRPC proxy)",
        stack.config,
        batch,
        f"the same {batch} calls one after another, best of {repeats}",
        max(concurrent),
        max(sequential),
    )


async def _close_sessions(stack: BenchStack, ids: list[str], tenant: str) -> None:
    import grpc

    from services.wire.protos import grpc_options, pb, pb_grpc

    async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
        stub = pb_grpc.MotionGeneratorStub(channel)
        for sid in ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CloseSession(
                    pb.CloseSessionRequest(session_id=sid, tenant_id=tenant),
                    metadata=stack.metadata(tenant),
                    timeout=30,
                )


def unbatched_generator_class():
    """The deployed Generator with serve.batch's max_batch_size set to 1 (one session per forward)."""
    from services.generator.deployment import Generator

    base = Generator.func_or_class

    class UnbatchedGenerator(base):  # type: ignore[misc, valid-type]
        def __init__(self, overrides: dict | None = None) -> None:
            super().__init__(overrides)
            self._batched.set_max_batch_size(1)

    UnbatchedGenerator.__qualname__ = UnbatchedGenerator.__name__ = "UnbatchedGenerator"
    return UnbatchedGenerator


async def service_batching_handles(stack: BenchStack, batch: int, rounds: int, repeats: int = 3) -> BatchFigure:
    """Deployment handles from the driver, B calls at once: the deployed generator (serve.batch,
    MAX_BATCH sessions per forward) against a variant deployment with max_batch_size 1; the two
    alternate `repeats` times, best of each."""
    from ray import serve

    from services.generator.deployment import Generator
    from services.wire.protos import pb
    from services.wire.tensors import encode

    overrides = {"model_preset": stack.config, "redis_url": stack.redis_url, "redis_prefix": stack.prefix}
    variant = Generator.options(name="generator_unbatched", num_replicas=1, func_or_class=unbatched_generator_class())
    serve.run(variant.bind(overrides), name=UNBATCHED_APP, route_prefix=None)
    tenant = "bench"
    targets = {
        "batched": serve.get_deployment_handle("generator", app_name=APP_NAME),
        "unbatched": serve.get_deployment_handle("generator_unbatched", app_name=UNBATCHED_APP),
    }
    sessions = {label: [f"h{label}-{uuid.uuid4().hex[:8]}-{i}" for i in range(batch)] for label in targets}
    figures: dict[str, list[float]] = {label: [] for label in targets}
    try:
        for label, handle in targets.items():
            for i, sid in enumerate(sessions[label]):
                await handle.options(method_name="OpenSession", session_id=sid).remote(
                    pb.OpenSessionRequest(
                        session_id=sid,
                        tenant_id=tenant,
                        avatar_id="bench",
                        options=pb.SessionOptions(warm_start=True, seed=i),
                        reference_motion=encode(np.full(512, 0.3, np.float32), "reference_motion"),
                    )
                )
        cursors = {label: dict.fromkeys(ids, 0) for label, ids in sessions.items()}
        for _ in range(repeats):
            for label, handle in targets.items():

                async def call(request, handle=handle):
                    options = handle.options(method_name="GenerateBlock", session_id=request.session_id)
                    return await options.remote(request)

                figures[label].append(await _rounds(cursors[label], call, tenant, rounds, True))
    finally:
        for label, handle in targets.items():
            for sid in sessions[label]:
                with contextlib.suppress(Exception):
                    await handle.options(method_name="CloseSession", session_id=sid).remote(
                        pb.CloseSessionRequest(session_id=sid, tenant_id=tenant)
                    )
        with contextlib.suppress(Exception):
            serve.delete(UNBATCHED_APP)
    return BatchFigure(
        "service (handles)",
        stack.config,
        batch,
        f"{batch} calls at once to a max_batch_size=1 variant, best of {repeats}",
        max(figures["batched"]),
        max(figures["unbatched"]),
    )


def _rate(blocks_s: float) -> str:
    return f"{blocks_s:.2f}" if blocks_s < 10 else f"{blocks_s:.1f}"


def batching_table(figures: list[BatchFigure]) -> str:
    rows = [
        [f.level, f.config, f.batch, f.how, _rate(f.batched_blocks_s), _rate(f.single_blocks_s), f"{f.ratio:.2f}x"]
        for f in figures
    ]
    return table(
        ["level", "config", "B", "one-at-a-time baseline", "batched blocks/s", "one-at-a-time blocks/s", "gain"],
        rows,
        "llrlrrr",
    )


# --- the command ------------------------------------------------------------------------------------------


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avatar-forcing serve-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "paper"), default="tiny", help="model preset of the stack")
    parser.add_argument("--generator-replicas", type=int, default=1)
    parser.add_argument("--latency-budget-s", type=float, default=DEFAULT_BUDGET_S, help="the policy's budget")
    parser.add_argument("--redis-url", help="Redis (default redis://127.0.0.1:6379/0; a private one if down)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per stage")
    parser.add_argument("--e2e-s", type=float, default=7.5, help="media seconds of the end-to-end session")
    parser.add_argument("--session-s", type=float, default=20.0, help="media seconds per session per step")
    parser.add_argument("--max-sessions", type=int, default=6, help="largest N tried")
    parser.add_argument(
        "--min-sessions", type=int, default=3, help="N tried in any case; above it the steps stop at the first miss"
    )
    parser.add_argument("--batch", type=int, default=4, help="B: sessions per batch at the service level")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of B blocks per timing (service level, 3 each)")
    parser.add_argument("--library-configs", default="tiny,paper", help="configs of the library-level figure")
    parser.add_argument("--library-batches", default="2,4,8", help="B values of the library-level figure (tiny)")
    parser.add_argument("--paper-batch", type=int, default=4, help="B of the library-level figure (paper)")
    parser.add_argument("--library-threads", type=int, default=1, help="torch threads (1 = as in a replica)")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--skip-service-batching", action="store_true")
    parser.add_argument("--skip-library", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    began = time.monotonic()
    out: list[str] = []

    def emit(text: str = "") -> None:
        out.append(text)
        print(text, flush=True)

    emit("# serve-bench")
    emit()
    emit(f"command: `avatar-forcing serve-bench{' ' + shlex.join(argv) if argv else ''}`  ")
    emit(f"machine: {machine()}  ")
    emit(
        f"stack: config {args.config}, real-time policy ON (degrade=True, "
        f"budget {args.latency_budget_s * 1000:.0f} ms), "
        f"{args.generator_replicas} generator replica(s), Ray Serve gRPC proxy on loopback, real Redis  "
    )
    emit("CPU timings on a shared machine are noisy: compare ratios, not absolute values.")
    media = load_media()
    needs_stack = not (args.skip_stages and args.skip_concurrency and args.skip_service_batching)
    if needs_stack:
        stack = start_stack(
            args.config,
            generator_replicas=args.generator_replicas,
            latency_budget_s=args.latency_budget_s,
            redis_url=args.redis_url,
        )
        emit(f"\nstack up after {time.monotonic() - began:.0f} s")
        try:
            _serving_sections(stack, media, args, emit)
        finally:
            stack.stop()
    if not args.skip_library:
        figures = []
        for config in (c.strip() for c in args.library_configs.split(",") if c.strip()):
            batches = [int(b) for b in args.library_batches.split(",")] if config == "tiny" else [args.paper_batch]
            for batch in batches:
                _log(f"library batching: {config}, B={batch}")
                repeats = 5 if config == "tiny" else 2
                figures.append(library_batching(config, batch, repeats, args.library_threads))
        emit("\n## Cross-session batching, library level (`BlockSampler.run`)\n")
        emit(batching_table(figures))
    emit(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


def _serving_sections(stack: BenchStack, media: Media, args: argparse.Namespace, emit: Callable[[str], None]) -> None:
    budget = args.latency_budget_s
    if not args.skip_stages:
        _log("stages ...")
        figures = asyncio.run(measure_stages(stack, media, args.repeats))
        _log("end-to-end session ...")
        frames = round(args.e2e_s * FPS)
        e2e = asyncio.run(paced_session(stack.target, stack.token(), media, frames, name="e2e"))
        emit("\n## Per-stage latency, one block of 10 frames\n")
        emit(stage_table(figures, e2e))
        if e2e.error or not e2e.continuous:
            emit(f"\nend-to-end session problem: {e2e.error or 'frames missing'}")
        else:
            emit(
                f"\nend-to-end session: {len(e2e.indices)} frames, {e2e.degraded_frames()} degraded, "
                "client-side block latency p50/p95 "
                + "/".join(_fmt(v, 0) for v in p50_p95(e2e.client_block_latencies()))
                + " ms (arrival of a block's last frame minus the end of its media time)"
            )
    if not args.skip_concurrency:
        steps = []
        frames = round(args.session_s * FPS)
        for n in range(1, args.max_sessions + 1):
            _log(f"concurrency: {n} session(s) x {args.session_s:.0f} s ...")
            step = asyncio.run(run_concurrent(stack, media, n, frames))
            steps.append(step)
            _wait_idle(stack)
            if not step.sustained(budget) and n >= args.min_sessions:
                break
        sustained = [s.sessions for s in steps if s.sustained(budget)]
        emit(f"\n## Concurrent real-time sessions ({args.session_s:.0f} s of media each, 25 fps, policy ON)\n")
        emit(concurrency_table(steps, budget))
        best = max(sustained) if sustained else 0
        emit(
            f"\nlargest N with real time sustained (p95 block latency < {budget * 1000:.0f} ms and "
            f"< {SUSTAINED_MAX_DEGRADED:.0%} degraded frames): **{best}**"
            + ("" if best < args.max_sessions else " (the largest tried; raise --max-sessions)")
        )
        problems = [f"N={s.sessions} {r.name}: {r.error}" for s in steps for r in s.results if r.error]
        for problem in problems:
            emit(f"- {problem}")
    if not args.skip_service_batching:
        _log("service batching ...")
        figures = [asyncio.run(service_batching_proxy(stack, args.batch, args.rounds))]
        figures.append(asyncio.run(service_batching_handles(stack, args.batch, args.rounds)))
        replicas = f"{stack.generator_replicas} generator replica" + ("s" if stack.generator_replicas > 1 else "")
        emit(f"\n## Cross-session batching, service level ({stack.config}, {replicas})\n")
        emit(batching_table(figures))
    _wait_idle(stack)
    deadline = time.monotonic() + 10.0
    while True:  # closing sessions delete their keys right after their last frame
        leaks = {kind: keys for kind, keys in session_keys(stack.redis_url, stack.prefix).items() if keys}
        if not leaks or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    caches = generator_replica_stats()
    busy = {name: s for name, s in caches.items() if s.get("sessions") or s.get("cache_bytes")}
    emit(
        f"\nafter the run: leaked Redis session keys {sum(len(v) for v in leaks.values())}, "
        f"generator replicas holding caches {len(busy)} of {len(caches)}"
    )


def _wait_idle(stack: BenchStack, timeout_s: float = 20.0) -> None:
    """Until every generator replica holds no session (closed sessions free their caches)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = generator_replica_stats()
        if all(not s.get("sessions") for s in stats.values()):
            return
        time.sleep(0.5)


__all__ = [
    "FPS",
    "BatchFigure",
    "BenchStack",
    "ConcurrencyStep",
    "Media",
    "SessionResult",
    "concurrency_table",
    "delete_prefix",
    "generator_replica_stats",
    "library_batching",
    "load_media",
    "main",
    "p50_p95",
    "paced_session",
    "percentile",
    "run_concurrent",
    "session_keys",
    "start_stack",
]

if __name__ == "__main__":
    raise SystemExit(main())
