"""Per-stage latency of one block: each stage's RPC with real request sizes (4 s of audio context,
10 face crops, the generator at full and reduced NFE and holding, the decoder to RAW_RGB and
JPEG), sent through Serve's gRPC proxy to the ingress, which forwards it to the stage."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME, preset
from bench.media import Media
from bench.sessions import SessionResult
from bench.stack import BenchStack
from bench.stats import fmt, p50_p95, table
from services.store import SessionStore


@dataclass
class StageFigure:
    """One stage's timed calls: their request and response sizes (bytes) and durations (ms)."""

    name: str
    request_bytes: int
    response_bytes: int
    ms: list[float]


async def _timed_calls(call: Callable[[], Awaitable[Any]], repeats: int, warmup: int) -> tuple[list[float], Any]:
    """Milliseconds of `repeats` calls after `warmup` untimed ones, and the last response."""
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

    from avatar_forcing.media.face_crop import FaceCropper, FaceTrack
    from services.wire.protos import Limit, grpc_options, pb, pb_grpc
    from services.wire.tensors import encode

    tenant, sid = "bench", f"stages-{uuid.uuid4().hex[:8]}"
    md = stack.metadata(tenant)
    model = preset(stack.config)
    size, block = model.motion_autoencoder.image_size, model.flow.block
    left_frames = 100  # 4 s of left context
    first = left_frames
    window = np.concatenate([media.avatar_chunk(i) for i in range(first + block)]).astype(np.float32) / 32768.0
    user_window = np.concatenate([media.user_chunk(i) for i in range(first + block)]).astype(np.float32) / 32768.0
    track = FaceTrack(FaceCropper.for_model(model.motion_autoencoder))
    crops = track.crops(media.frames[first : first + block], "user camera")
    figures: list[StageFigure] = []

    def extract(samples: np.ndarray, source: int) -> pb.ExtractFeaturesRequest:
        return pb.ExtractFeaturesRequest(
            session_id=sid,
            tenant_id=tenant,
            source=source,
            samples=encode(samples, "samples"),
            sample_rate=16000,
            first_frame=first,
            num_frames=block,
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

        # The stages serve only sessions that exist (services.ingress.access): the portrait first,
        # then the session's record, as the ingress makes them.
        portrait = await stage(
            "MotionEncoder.EncodePortrait (once per session)",
            motion.EncodePortrait,
            pb.EncodePortraitRequest(tenant_id=tenant, image=media.portrait),
            n=max(5, repeats // 3),
        )
        store = SessionStore(stack.redis_url, stack.prefix)
        await store.create(sid, tenant, portrait.avatar_id, status="active")
        try:
            avatar_request = extract(window, pb.AVATAR)
            label = "AudioFeatures.Extract (4 s context + 10 frames)"
            avatar_features = await stage(label, audio.Extract, avatar_request)
            user_features = await audio.Extract(extract(user_window, pb.USER), metadata=md, timeout=60)
            motion_request = pb.EncodeUserMotionRequest(
                session_id=sid,
                tenant_id=tenant,
                first_frame=first,
                crops=encode(crops, "crops", max_bytes=Limit.MAX_CROPS_TENSOR_BYTES),
            )
            label = f"MotionEncoder.EncodeUserMotion (10 crops {size}x{size})"
            user_motion = await stage(label, motion.EncodeUserMotion, motion_request)

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
                # Decoded while the session exists: CloseSession ends its record.
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
            finally:
                await generator.CloseSession(pb.CloseSessionRequest(session_id=sid, tenant_id=tenant), metadata=md)
        finally:
            with contextlib.suppress(Exception):
                await store.close(sid, tenant)
            await store.aclose()
    return figures


def stage_table(figures: list[StageFigure], e2e: SessionResult | None) -> str:
    """The stage figures as a markdown table, with the end-to-end session's block latency last."""
    rows = []
    for f in figures:
        p50, p95 = p50_p95(f.ms)
        rows.append([f.name, len(f.ms), f"{f.request_bytes:,}", f"{f.response_bytes:,}", fmt(p50), fmt(p95)])
    if e2e is not None:
        blocks = e2e.block_latencies()
        p50, p95 = p50_p95(blocks)
        label = f"end to end: AvatarSession.Stream block latency ({e2e.frames_sent} frames at 25 fps)"
        rows.append([label, f"{len(blocks)} blocks", "", "", fmt(p50), fmt(p95)])
    return table(["stage (through Serve's gRPC proxy)", "calls", "request B", "response B", "p50 ms", "p95 ms"], rows)


# --- 2. concurrent real-time sessions -------------------------------------------------------------------
