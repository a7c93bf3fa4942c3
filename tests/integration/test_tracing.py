"""Tracing and metrics of a session: the in-process pipeline over the real servicers (real Redis, no Ray).

One trace per block: a root span `block`, a child span per stage call in the ingress, and under each the
servicer's RPC span, continued from the `traceparent` the request carried. The metrics are the
prometheus_client fallback's (`telemetry.use_metrics("prometheus")`).
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
from opentelemetry.trace import SpanKind, StatusCode

from avatar_forcing.config import tiny
from avatar_forcing.nn.model import random_model
from services.common import telemetry
from services.generator.servicer import session_bytes
from services.ingress.config import IngressSettings
from services.ingress.pipeline import SessionPipeline
from services.store import SessionStore
from services.wire.protos import pb
from tests.integration.conftest import FRAMES
from tests.integration.test_session_pipeline import client_messages, iterate, stages_for

pytestmark = pytest.mark.integration
TOKEN = "tok-SECRET-do-not-trace-5f3a"
RPC_OF_STAGE = {
    "audio_features": "avatar_forcing.v1.AudioFeatures/Extract",
    "motion_encoder": "avatar_forcing.v1.MotionEncoder/EncodeUserMotion",
    "generate": "avatar_forcing.v1.MotionGenerator/GenerateBlock",
    "decode": "avatar_forcing.v1.FrameDecoder/Decode",
}
REDUCED_CALL, HELD_CALL = 3, 4  # GenerateBlock calls forced to degrade (the policy's own requests)


@pytest.fixture(scope="module")
def model():
    return random_model(tiny(), seed=0)


def with_token(messages):
    """The client's messages with an auth token in Start (which must never reach a span)."""
    for message in messages:
        if message.WhichOneof("message") == "start":
            message.start.auth_token = TOKEN
        yield message


def late_video_frame(frames):
    """A camera frame for frame 0, sent after all media: behind the generation cursor, so dropped."""
    h, w = frames[0].shape[:2]
    image = pb.Image(format=pb.RAW_RGB, width=w, height=h, data=frames[0].tobytes())
    return pb.ClientMessage(video=pb.VideoFrame(timestamp_us=0, image=image))


async def run_session(model, redis_url, prefix, media, m: telemetry.Metrics):
    portrait_png, speech, user, frames = media
    store = SessionStore(redis_url, prefix=prefix)
    stages = stages_for(model, store)
    generate, calls, load = stages.generate_block, {"n": 0}, []

    async def degrading(request):
        # What the real-time policy asks of a late session, forced here: fewer steps, then a held block.
        calls["n"] += 1
        if calls["n"] == REDUCED_CALL:
            request.max_nfe = 5
        if calls["n"] == HELD_CALL:
            request.hold = True
        load.append(
            (m.value("generator_sessions", replica="replica-1"), m.value("generator_cache_bytes", replica="replica-1"))
        )
        return await generate(request)

    stages.generate_block = degrading

    messages = list(with_token(client_messages(portrait_png, speech, user, frames)))
    messages.insert(-1, late_video_frame(frames))  # before EndOfInput
    pipeline = SessionPipeline(stages, store, IngressSettings(image_size=64, degrade=False), "acme")
    out = [message async for message in pipeline.run(iterate(messages))]
    await store.aclose()
    return [message.frame for message in out if message.WhichOneof("message") == "frame"], load


def test_one_trace_per_block_with_a_span_per_stage_and_the_metrics(model, media, redis_url, prefix, spans):
    m = telemetry.use_metrics("prometheus")
    frames, load = asyncio.run(run_session(model, redis_url, prefix, media, m))
    assert [f.frame_index for f in frames] == list(range(FRAMES))
    finished = spans.get_finished_spans()
    by_id = {s.context.span_id: s for s in finished}
    children: dict[int, list] = {}
    for s in finished:
        if s.parent is not None:
            children.setdefault(s.parent.span_id, []).append(s)

    # -- one trace per block, a `block` root each ----------------------------------------------
    blocks = sorted((s for s in finished if s.name == "block"), key=lambda s: s.attributes["block.first_frame"])
    assert [b.attributes["block.first_frame"] for b in blocks] == [0, 10, 20, 30]
    assert all(b.parent is None for b in blocks)
    trace_ids = [b.context.trace_id for b in blocks]
    assert len(set(trace_ids)) == len(blocks)
    assert {s.context.trace_id for s in finished} == set(trace_ids), "every span belongs to a block's trace"
    for s in finished:  # no dangling parents: each trace is one tree under its block
        assert s.parent is None or s.parent.span_id in by_id, s.name

    for index, block in enumerate(blocks):
        # -- a span per stage call in the ingress, each with the servicer's RPC span under it ---
        stage_spans = children[block.context.span_id]
        assert Counter(s.name for s in stage_spans) == {
            "audio_features": 2,
            "motion_encoder": 1,
            "generate": 1,
            "decode": 1,
        }, index
        assert {s.attributes["source"] for s in stage_spans if s.name == "audio_features"} == {"AVATAR", "USER"}
        for stage in stage_spans:
            assert stage.kind == SpanKind.CLIENT and stage.context.trace_id == block.context.trace_id
            (server,) = children[stage.context.span_id]  # continued from request.traceparent
            assert server.name == RPC_OF_STAGE[stage.name]
            assert server.kind == SpanKind.SERVER and server.context.trace_id == block.context.trace_id
            assert server.attributes["session_id"] == block.attributes["session_id"]
            assert server.attributes["tenant_id"] == "acme"
            assert server.status.status_code != StatusCode.ERROR
            assert stage.start_time <= server.start_time <= server.end_time <= stage.end_time
            assert block.start_time <= stage.start_time <= stage.end_time <= block.end_time
        generate_server = children[next(s for s in stage_spans if s.name == "generate").context.span_id][0]
        assert generate_server.attributes["replica_id"] == "replica-1"

        # -- the block's attributes ------------------------------------------------------------
        attributes = block.attributes
        assert attributes["tenant_id"] == "acme" and len(attributes["session_id"]) == 32
        assert attributes["block.frames"] == 10 and attributes["block.output_frames"] == 10
        assert attributes["block.output_first_frame"] == 10 * index
        assert attributes["block.latency_ms"] > 0 and attributes["block.realtime_factor"] > 0
        expected_level = {REDUCED_CALL - 1: 1, HELD_CALL - 1: 2}.get(index, 0)
        assert attributes["block.degradation"] == expected_level, index
        assert attributes["block.nfe_used"] == (5 if expected_level == 1 else 10), index
        block_frames = frames[10 * index : 10 * index + 10]
        assert {f.timing.degradation for f in block_frames} == {expected_level}  # the client saw the same

    # -- no secrets in any span -------------------------------------------------------------------
    for s in finished:
        for key, value in s.attributes.items():
            assert "token" not in key.lower() and TOKEN not in str(value), (s.name, key)

    # -- metrics -------------------------------------------------------------------------------------
    def count(stage):
        return m.value("block_latency_seconds_count", stage=stage)

    assert count("end_to_end") == 4
    assert (count("audio_features"), count("motion_encoder"), count("generate"), count("decode")) == (8, 4, 4, 4)
    assert m.value("realtime_factor_count") == 4
    assert m.value("block_latency_seconds_sum", stage="end_to_end") == pytest.approx(
        sum(b.attributes["block.latency_ms"] for b in blocks) / 1000
    )
    degraded = Counter(f.timing.degradation for f in frames)
    assert m.value("frames_degraded_total", level="reduced_nfe") == degraded[1] == 10
    assert m.value("frames_degraded_total", level="held_frame") == degraded[2] == 10
    assert m.value("frames_degraded_total", level="none") is None
    assert m.value("frames_dropped_total", reason="held_frame") == 10
    assert m.value("frames_dropped_total", reason="late_video") == 1
    # While the session ran its replica held it; once closed, nothing.
    one = session_bytes(model.block_sampler().model.config, 10)
    assert load == [(1.0, float(one))] * 4
    assert m.value("generator_sessions", replica="replica-1") == 0
    assert m.value("generator_cache_bytes", replica="replica-1") == 0
