"""A 60 s load test of the whole stack: N = 3 concurrent AvatarSession.Stream sessions paced at real
time (tiny model, the real-time policy ON) through Ray Serve's gRPC proxy, real Redis, two generator
replicas. When a session ends a new one starts in its slot, until 60 s have passed.

At the end: every session got Started and all its frames with continuous indices (held frames count
as frames); block latency did not grow without bound (p95 of the last third of the run <= 2x the
p95 of the first third, or <= the policy's budget); no Redis key of any session is left under the
test's prefix; every generator replica holds no session and no cache bytes.

    pytest -m integration tests/integration/test_load.py -s      # -s prints the figures

AF_LOAD_TEST_S shortens or lengthens the run (default 60); AF_TEST_REDIS_URL picks the Redis (a
private redis-server is started when nothing answers there).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from avatar_forcing.config import FPS
from bench.leaks import generator_replica_stats
from bench.media import Media, load_media
from bench.sessions import SessionResult, paced_session
from bench.stack import start_stack
from bench.stats import p50_p95
from services.store.inspection import leaked_session_keys as session_keys

pytestmark = pytest.mark.integration

LOAD_S = float(os.environ.get("AF_LOAD_TEST_S", "60"))
SESSIONS = 3
SESSION_S = 12.0  # media seconds of one session (the samples, looped)
MIN_SESSION_S = 2.0  # no session shorter than this is started near the end
GENERATOR_REPLICAS = 2
BUDGET_S = 0.8
DRAIN_S = 180.0  # how long sessions may take to deliver their frames after their input ended
SETTLE_S = 30.0  # how long closed sessions may take to free their keys and caches


@pytest.fixture(scope="module")
def stack():
    redis_url = os.environ.get("AF_TEST_REDIS_URL", "redis://127.0.0.1:6379/12")
    running = start_stack(
        "tiny",
        generator_replicas=GENERATOR_REPLICAS,
        degrade=True,
        latency_budget_s=BUDGET_S,
        redis_url=redis_url,
        prefix=f"load-{uuid.uuid4().hex[:8]}",
    )
    try:
        yield running
    finally:
        running.stop()  # also deletes every key of the prefix (the avatars' portraits too)


async def run_load(stack, media: Media, began: float) -> list[SessionResult]:
    """SESSIONS slots; each runs sessions one after another while the load window lasts."""
    deadline = began + LOAD_S

    async def slot(k: int) -> list[SessionResult]:
        await asyncio.sleep(k * 0.4 / SESSIONS)  # block edges of the slots not aligned
        results, number = [], 0
        while (remaining := deadline - time.monotonic()) >= MIN_SESSION_S:
            frames = round(min(SESSION_S, remaining) * FPS)
            result = await paced_session(
                stack.target,
                stack.token("loadtest"),
                media,
                frames,
                name=f"slot{k}-{number}",
                media_offset=53 * k + 7 * number,
                seed=100 * k + number,
                timeout_s=frames / FPS + DRAIN_S,
            )
            results.append(result)
            number += 1
            if result.error:
                break  # reported by the assertions; no retry storm
        return results

    slots = await asyncio.gather(*(slot(k) for k in range(SESSIONS)))
    return [result for results in slots for result in results]


def wait_until(condition, timeout_s: float, period_s: float = 0.5):
    """Poll `condition()` until it returns a falsy "problems" value; returns the last one."""
    deadline = time.monotonic() + timeout_s
    while True:
        problems = condition()
        if not problems or time.monotonic() > deadline:
            return problems
        time.sleep(period_s)


def test_three_realtime_sessions_for_60_s_leave_nothing_behind(stack):
    media = load_media()
    began = time.monotonic()
    results = asyncio.run(asyncio.wait_for(run_load(stack, media, began), LOAD_S + DRAIN_S + 60))
    load_s = time.monotonic() - began

    # -- every session: Started, all its frames, continuous indices ------------------------------------
    assert len({r.name.split("-")[0] for r in results}) == SESSIONS, [r.name for r in results]
    for r in results:
        assert r.started and not r.error, f"{r.name}: {r.error or 'no Started'}"
        assert r.frames_sent >= MIN_SESSION_S * FPS
        missing = sorted(set(range(r.frames_sent)) - set(r.indices))
        assert r.continuous, (
            f"{r.name}: {len(r.indices)} frames of {r.frames_sent}; missing {missing[:10]}, "
            f"out of order or repeated: {r.indices != sorted(set(r.indices))}"
        )

    # -- block latency bounded: p95 of the last third vs the first third of the run ------------------
    third = LOAD_S / 3
    blocks = [(at - began, latency) for r in results for at, latency in r.blocks()]
    first = [latency for t, latency in blocks if t < third]
    last = [latency for t, latency in blocks if t >= 2 * third]
    first_p95, last_p95 = p50_p95(first)[1], p50_p95(last)[1]
    frames = sum(len(r.indices) for r in results)
    degraded = sum(r.degraded_frames() for r in results)
    held = sum(r.degradation.count("HELD_FRAME") for r in results)
    client_p50, client_p95 = p50_p95([x for r in results for x in r.client_block_latencies()])
    print(
        f"\nload: {len(results)} sessions in {SESSIONS} slots over {load_s:.0f} s (window {LOAD_S:.0f} s), "
        f"{frames} frames, {degraded} degraded ({held} held, {100 * degraded / max(frames, 1):.1f} %); "
        f"block latency p95 first third {first_p95:.0f} ms ({len(first)} blocks), last third {last_p95:.0f} ms "
        f"({len(last)} blocks); client-side block latency p50/p95 {client_p50:.0f}/{client_p95:.0f} ms"
    )
    assert first and last, (len(first), len(last))
    assert last_p95 <= 2 * first_p95 or last_p95 <= BUDGET_S * 1000, (first_p95, last_p95)

    # -- nothing left behind: Redis keys of the sessions, generator caches ------------------------------
    def leaked_keys():
        return {kind: keys for kind, keys in session_keys(stack.redis_url, stack.prefix).items() if keys}

    leaks = wait_until(leaked_keys, SETTLE_S)
    assert not leaks, leaks

    def busy_replicas():
        stats = generator_replica_stats()
        assert len(stats) == GENERATOR_REPLICAS, stats
        return {name: s for name, s in stats.items() if s["sessions"] or s["cache_bytes"]}

    busy = wait_until(busy_replicas, SETTLE_S)
    assert not busy, busy
