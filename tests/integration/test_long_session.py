"""A 30-minute session through the ingress, in seconds: its memory stays flat and a write's cost does not grow.

45 000 frames (1 800 s of 16 kHz avatar and user audio, in CHUNK_MS chunks) go through a
`SessionPipeline` whose stages are instant in-process fakes (real Redis for the session record).
The client is paced by the pipeline's output, not by a clock: it sends at most LEAD frames
ahead of the last frame it got back, as a real-time client of an infinitely fast server would.
Nothing sleeps. The fakes check what the pipeline sends them (each feature window's samples,
each frame's audio), so a timeline that forgot or misplaced audio fails here too.
"""

from __future__ import annotations

import asyncio
import time
import tracemalloc
from dataclasses import dataclass, field

import numpy as np
import pytest

from avatar_forcing.engine.streaming_audio import DEFAULT_LEFT_CONTEXT_S
from services.ingress.config import IngressSettings, Stages
from services.ingress.pipeline import SessionPipeline
from services.store import SessionStore
from services.wire.protos import Limit, pb
from services.wire.tensors import decode as decode_tensor
from services.wire.tensors import encode
from tests.redis_support import keys_with

pytestmark = pytest.mark.integration

FRAMES = 45_000  # 30 minutes at 25 fps
FRAME = 640  # samples per frame
CHUNK_MS = 40  # per AudioChunk (WebRTC sends 20-60 ms)
CHUNK = CHUNK_MS * Limit.SAMPLE_RATE // 1000  # samples
CHUNKS = FRAMES * FRAME // CHUNK
MINUTE = 60_000 // CHUNK_MS  # chunks
LEAD = 30  # frames the client may send ahead of what it got back
LEFT = round(DEFAULT_LEFT_CONTEXT_S * Limit.FPS)  # frames of left context before a block
PATTERN = 48_017  # samples before a source's test signal repeats (prime: never aligned with chunks)
SIGNALS = {  # one period and the start of the next, so that any chunk is one slice
    source: np.resize(np.random.default_rng(seed).integers(-20_000, 20_000, PATTERN, dtype=np.int16), PATTERN + CHUNK)
    for seed, source in enumerate((pb.AVATAR, pb.USER))
}


def signal(source: int, start: int, stop: int) -> np.ndarray:
    """Samples [start, stop) of a source's test signal (at most CHUNK of them)."""
    offset = start % PATTERN
    return SIGNALS[source][offset : offset + stop - start]


def fake_stages() -> Stages:
    """Instant stages that answer like the real ones and check the audio windows they are sent."""
    latents = encode(np.zeros((10, 4), np.float32), "latents")

    async def extract(request: pb.ExtractFeaturesRequest) -> pb.ExtractFeaturesResponse:
        first, frames, left = request.first_frame, request.num_frames, request.left_context_samples
        assert left == min(first, LEFT) * FRAME, (first, left)
        window = decode_tensor(request.samples, "samples")
        start = first * FRAME - left
        assert window.shape[0] == left + frames * FRAME, (first, window.shape)
        for at in (start, (first + frames - 1) * FRAME):  # its first and its last frame's samples
            got = (window[at - start : at - start + FRAME] * 32768.0).astype(np.int16)  # exact: int16 / 2**15
            assert np.array_equal(got, signal(request.source, at, at + FRAME)), (request.source, first, at)
        return pb.ExtractFeaturesResponse(features=encode(np.zeros((frames, 4), np.float32), "features"))

    async def encode_user_motion(request):
        raise AssertionError("no camera in this session")

    async def encode_portrait(request):
        return pb.EncodePortraitResponse(avatar_id="fake-avatar", reference_motion=encode(np.zeros(4, np.float32), "r"))

    async def open_session(request):
        return pb.OpenSessionResponse(block=10, window=10, first_output_after=10)

    async def generate_block(request: pb.GenerateBlockRequest) -> pb.GenerateBlockResponse:
        frames = request.avatar_audio.shape[0]
        return pb.GenerateBlockResponse(
            latents=latents if frames == 10 else encode(np.zeros((frames, 4), np.float32), "latents"),
            first_frame=request.first_frame,
            nfe_used=request.max_nfe or 10,
            next_input_frame=request.first_frame + frames,
            held=request.hold,
        )

    async def close_session(request):
        return pb.CloseSessionResponse()

    async def decode(request: pb.DecodeRequest) -> pb.DecodeResponse:
        image = pb.Image(format=pb.JPEG, width=16, height=16, data=b"jpeg")
        frames = range(request.first_frame, request.first_frame + request.latents.shape[0])
        return pb.DecodeResponse(frames=[pb.DecodedFrame(frame_index=i, image=image) for i in frames])

    return Stages(extract, encode_user_motion, encode_portrait, open_session, generate_block, close_session, decode)


@dataclass
class Probe:
    """What the client saw of the ingress at each minute, and the cost of every timeline write."""

    emitted: int = 0  # frames received back
    progress: asyncio.Event = field(default_factory=asyncio.Event)
    write_ns: np.ndarray = field(default_factory=lambda: np.zeros((2, CHUNKS), np.int64))  # [source, chunk]
    traced: dict[int, tuple[int, int]] = field(default_factory=dict)  # minute -> tracemalloc (current, peak)
    capacity: dict[int, tuple[int, int]] = field(default_factory=dict)  # minute -> (avatar, user) samples
    kept: dict[int, tuple[int, int]] = field(default_factory=dict)
    moved: dict[int, tuple[int, int]] = field(default_factory=dict)  # minute -> samples moved so far


def timed_writes(pipeline: SessionPipeline, probe: Probe) -> None:
    for row, timeline in enumerate((pipeline.state.avatar, pipeline.state.user)):
        write = timeline.write

        def timed(timestamp_us: int, pcm: np.ndarray, write=write, row=row) -> None:
            start = time.perf_counter_ns()
            write(timestamp_us, pcm)
            probe.write_ns[row, timestamp_us // (CHUNK_MS * 1000)] = time.perf_counter_ns() - start

        timeline.write = timed


async def client(pipeline: SessionPipeline, probe: Probe):
    yield pb.ClientMessage(start=pb.Start(portrait=b"fake portrait", output_format=pb.JPEG))
    timelines = (pipeline.state.avatar, pipeline.state.user)
    for chunk in range(CHUNKS + 1):
        if chunk % MINUTE == 0:
            minute = chunk // MINUTE
            probe.traced[minute] = tracemalloc.get_traced_memory()
            probe.capacity[minute] = tuple(t.capacity for t in timelines)
            probe.kept[minute] = tuple(t.kept for t in timelines)
            probe.moved[minute] = tuple(t.samples_moved for t in timelines)
            if minute == 5:
                tracemalloc.reset_peak()  # from here on: the peak of minutes 5 to 30
        if chunk == CHUNKS:
            break
        while (chunk + 1) * CHUNK // FRAME - probe.emitted > LEAD:
            probe.progress.clear()
            await probe.progress.wait()
        timestamp_us = chunk * CHUNK_MS * 1000
        for source in (pb.AVATAR, pb.USER):
            pcm = signal(source, chunk * CHUNK, (chunk + 1) * CHUNK).tobytes()
            audio = pb.AudioChunk(source=source, timestamp_us=timestamp_us, sample_rate=16_000, pcm_s16le=pcm)
            yield pb.ClientMessage(audio=audio)
    yield pb.ClientMessage(end_of_input=pb.EndOfInput())


async def run_session(redis_url: str, prefix: str, probe: Probe) -> None:
    store = SessionStore(redis_url, prefix=prefix)
    # The client is paced by the output, not by time: wall-clock latencies mean nothing here.
    pipeline = SessionPipeline(fake_stages(), store, IngressSettings(image_size=64, degrade=False), "acme")
    timed_writes(pipeline, probe)
    async for message in pipeline.run(client(pipeline, probe)):
        kind = message.WhichOneof("message")
        assert kind in ("started", "frame"), message
        if kind == "frame":
            index = message.frame.frame_index
            assert index == probe.emitted
            expected = signal(pb.AVATAR, index * FRAME, (index + 1) * FRAME)
            assert message.frame.audio_pcm_s16le == expected.tobytes(), index
            probe.emitted = index + 1
            probe.progress.set()
    await store.aclose()


def test_a_30_minute_session_keeps_flat_memory_and_constant_write_cost(redis_url, prefix):
    probe = Probe()
    tracemalloc.start()
    try:
        started = time.perf_counter()
        asyncio.run(run_session(redis_url, prefix, probe))
        elapsed = time.perf_counter() - started
    finally:
        tracemalloc.stop()
    assert probe.emitted == FRAMES  # every frame of the 30 minutes, with its audio
    assert keys_with(redis_url, f"{prefix}:session*") == []

    (current5, _), (current30, peak) = probe.traced[5], probe.traced[30]
    first, last = probe.write_ns[:, :MINUTE], probe.write_ns[:, -MINUTE:]
    per_minute_moved = [np.subtract(probe.moved[m + 1], probe.moved[m]) for m in range(30)]
    print(
        f"\n30 min session in {elapsed:.1f} s; traced memory at minute 5 {current5 / 2**20:.2f} MiB, "
        f"at minute 30 {current30 / 2**20:.2f} MiB, peak in between {peak / 2**20:.2f} MiB\n"
        f"timeline capacity (avatar, user) at 5 {probe.capacity[5]}, at 30 {probe.capacity[30]} samples; "
        f"kept at 30 {probe.kept[30]}\n"
        f"write: mean {first.mean() / 1e3:.1f} / median {np.median(first) / 1e3:.1f} us in minute 1, "
        f"mean {last.mean() / 1e3:.1f} / median {np.median(last) / 1e3:.1f} us in minute 30; "
        f"samples moved per write in minute 1 {per_minute_moved[0] / MINUTE}, "
        f"in minute 30 {per_minute_moved[-1] / MINUTE}"
    )
    # Memory: what the ingress holds at minute 30 is what it held at minute 5 (an unbounded
    # timeline would hold 2 x 25 min x 32 kB/s = 96 MB more), and nothing spiked meanwhile.
    assert current30 - current5 < 1 << 20
    assert peak - current5 < 4 << 20
    # The timelines keep the left context, a block and the client's lead, and stopped growing.
    window = (LEFT + 2 * 10 + LEAD) * FRAME + CHUNK
    assert all(kept <= window for kept in probe.kept[30]), probe.kept[30]
    assert probe.capacity[30] == probe.capacity[5] and max(probe.capacity[30]) <= 4 * window
    # A write's cost: what it copies besides its own chunk is amortised below one sample per
    # sample written, in the last minute as in the first (an O(n) write copies all 30 minutes).
    assert all((moved <= MINUTE * CHUNK).all() for moved in per_minute_moved), per_minute_moved
    # And its time does not grow: generous against a noisy machine, an O(n) write is ~100x slower.
    assert np.median(last) < 3 * np.median(first) + 20_000, (np.median(first), np.median(last))
