"""The bridge worker: dispatch orders through real Redis (the gateway's stream and consumer group)
into one process holding several sessions (in-memory rooms, fake session backend, virtual clock)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import httpx
import numpy as np
import pytest
import redis
from livekit import rtc

from services.bridge.backend import FakeBackend, JoinOrder
from services.bridge.memory_room import MemoryServer, wait_until
from services.bridge.protocol import PUBLISH_ON_BEHALF
from services.bridge.worker import BridgeWorker, WorkerSettings
from services.store import SessionStore
from tests.bridge.harness import Call, run_virtual, tone
from tests.integration.virtual_time import VirtualClock

pytestmark = pytest.mark.integration


def join_order(i: int, expires_ms: int | None = None) -> dict:
    sid = f"ses{i}"
    return {
        "version": 1,
        "action": "join",
        "session_id": sid,
        "tenant_id": "acme",
        "avatar_id": "ava",
        "room": f"room{i}",
        "livekit_url": "memory://",
        "bridge_token": "tok",
        "avatar_identity": f"af-avatar-{sid}",
        "agent_identity": f"agent{i}",
        "session_token": "tok",
        "grpc_target": "127.0.0.1:1",
        "options": {},
        "issued_ms": int(time.time() * 1000),
        "expires_ms": expires_ms if expires_ms is not None else int(time.time() * 1000) + 600_000,
    }


def test_four_sessions_in_one_bridge_process_each_hear_only_their_agent(redis_url, prefix):
    clock = VirtualClock(1000.0)
    servers = {f"room{i}": MemoryServer(f"room{i}") for i in range(4)}
    backend = FakeBackend()

    def room_factory(order: JoinOrder):
        return servers[order.room].room(
            order.avatar_identity,
            rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
            **{PUBLISH_ON_BEHALF: order.agent_identity},
        )

    async def main():
        store = clock.wrap(SessionStore(redis_url, prefix, timeout_s=5.0))
        worker = BridgeWorker(
            store,
            WorkerSettings(redis_url=redis_url, redis_prefix=prefix, bridge_id="b1", max_sessions=8, block_ms=0),
            room_factory=room_factory,
            backend=backend,
        )
        await store.ensure_dispatch_group()
        calls = []
        for i in range(4):  # the agent side of each room (livekit-agents' DataStreamAudioOutput)
            call = Call(servers[f"room{i}"], backend, f"ses{i}", f"agent{i}", agent_rate=16000)
            await call.agent_room.connect()
            calls.append(call)
        for i in range(4):
            await store.dispatch_bridge("join", join_order(i))
        await store.dispatch_bridge("join", join_order(0))  # a duplicate: idempotent
        await store.dispatch_bridge("join", join_order(9, expires_ms=1))  # expired: dropped
        await store.dispatch_bridge("leave", {"session_id": "nobody", "reason": "stopped"})
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: len(worker.sessions) == 4, 30)
        from livekit.agents.voice.avatar import DataStreamAudioOutput

        for call in calls:
            call.output = DataStreamAudioOutput(
                call.agent_room,
                destination_identity=call.order.avatar_identity,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                sample_rate=16000,
            )
            call.output.on("playback_finished", call.finished.append)

        async def turn(i: int, call: Call) -> None:
            await call.say(tone(0.2 * (i + 1), rate=16000, freq=200 + 100 * i))
            await asyncio.wait_for(call.output.wait_for_playout(), 10)

        await asyncio.gather(*(turn(i, c) for i, c in enumerate(calls)))
        health = worker.health()
        metrics = worker.metrics_text()
        sessions = {sid: s for sid, (s, _) in worker.sessions.items()}
        for i in range(4):
            await store.dispatch_bridge("leave", {"session_id": f"ses{i}", "reason": "stopped"})
        await wait_until(lambda: not worker.sessions, 30)
        await worker.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return calls, worker, health, metrics, sessions

    with asyncio.Runner(loop_factory=clock.loop) as runner:
        calls, worker, health, metrics, sessions = runner.run(main())
    for i, call in enumerate(calls):
        assert [round(e.playback_position, 3) for e in call.finished] == [round(0.2 * (i + 1), 3)]
        speech = backend.streams[f"ses{i}"].avatar  # the session's avatar timeline holds its agent's speech only
        said = tone(0.2 * (i + 1), rate=16000, freq=200 + 100 * i)
        start = int(np.flatnonzero(speech)[0]) - 1  # the tone starts with a zero sample
        assert np.array_equal(speech[start : start + said.shape[0]], said)
        assert not np.any(speech[start + said.shape[0] :]) and not np.any(speech[:start])
        assert sessions[f"ses{i}"].reason.startswith("left")
        assert not sessions[f"ses{i}"]._tasks and backend.streams[f"ses{i}"].closed
    assert health["sessions"] == 4 and health["status"] == "ok"
    assert "af_bridge_sessions 4" in metrics
    assert worker.counters["joins_expired"] == 1 and worker.counters["sessions_started"] == 4
    assert worker.ended["left"] == 4
    client = redis.Redis.from_url(redis_url)
    try:
        pending = client.xpending(f"{prefix}:bridge:dispatch", "bridges")
    finally:
        client.close()
    assert pending["pending"] == 0  # every order was acked


def test_a_full_worker_leaves_orders_to_others_and_probes_answer(redis_url, prefix):
    async def main():
        store = SessionStore(redis_url, prefix, timeout_s=5.0)
        servers = {f"room{i}": MemoryServer(f"room{i}") for i in range(3)}
        worker = BridgeWorker(
            store,
            WorkerSettings(redis_url=redis_url, redis_prefix=prefix, bridge_id="b1", max_sessions=2, block_ms=100),
            room_factory=lambda o: servers[o.room].room(o.avatar_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT),
            backend=FakeBackend(),
        )
        await store.ensure_dispatch_group()
        for i in range(3):
            await store.dispatch_bridge("join", join_order(i))
        probes = await worker.serve_probes(host="127.0.0.1", port=0)
        port = probes.addresses[0][1]
        task = asyncio.create_task(worker.run())
        await wait_until(lambda: len(worker.sessions) == 2, 10)
        await asyncio.sleep(0.5)
        held = sorted(worker.sessions)
        async with httpx.AsyncClient() as http:
            health = (await http.get(f"http://127.0.0.1:{port}/healthz")).json()
            metrics = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        other = await store.read_dispatch("b2", count=10)  # another worker of the group takes the third
        await worker.aclose()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await probes.cleanup()
        await store.aclose()
        return held, health, metrics, other

    held, health, metrics, other = asyncio.run(main())
    assert held == ["ses0", "ses1"] and health["sessions"] == 2 and health["max_sessions"] == 2
    assert "af_bridge_max_sessions 2" in metrics
    assert [order["session_id"] for _, _, order in other] == ["ses2"]


def test_orders_a_dead_worker_left_pending_are_claimed_once_after_min_idle(redis_url, prefix):
    min_idle_s = 0.8
    servers = {f"room{i}": MemoryServer(f"room{i}") for i in (0, 1, 9)}
    started: list[tuple[str, str, float]] = []  # (session, grpc target, when): each room join tried

    def room_factory(order: JoinOrder):
        started.append((order.session_id, order.grpc_target, time.monotonic()))
        return servers[order.room].room(order.avatar_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT)

    def worker(store: SessionStore, bridge_id: str) -> BridgeWorker:
        settings = WorkerSettings(redis_url=redis_url, redis_prefix=prefix, bridge_id=bridge_id, max_sessions=4,
                                  block_ms=100, claim_idle_ms=int(min_idle_s * 1000), claim_interval_s=0.1,
                                  grpc_target="serve:9000")  # fmt: skip
        return BridgeWorker(store, settings, room_factory=room_factory, backend=FakeBackend())

    async def main():
        store = SessionStore(redis_url, prefix, timeout_s=5.0)
        await store.ensure_dispatch_group()
        await store.dispatch_bridge("join", join_order(0))
        # Valid when read, expired by the time anyone may claim it: dropped and acked, never run.
        await store.dispatch_bridge("join", join_order(9, expires_ms=int(time.time() * 1000) + 300))
        died = time.monotonic()  # before the read: Redis counts idle time from the delivery, not after it
        dead = await store.read_dispatch("dead", count=10)  # a worker takes both orders, then dies unacked
        assert [o["session_id"] for _, _, o in dead] == ["ses0", "ses9"]
        assert await store.claim_dispatch("early", min_idle_ms=60_000) == [], "not idle long enough yet"
        await store.dispatch_bridge("join", join_order(1))  # a new order, for the live workers
        workers = [worker(store, "b1"), worker(store, "b2")]
        tasks = [asyncio.create_task(w.run()) for w in workers]

        def held() -> set[str]:
            return {sid for w in workers for sid in w.sessions}

        await wait_until(lambda: held() == {"ses0", "ses1"}, 10)
        await asyncio.sleep(min_idle_s * 2)  # several claim rounds of both workers past min_idle
        sessions = [sorted(w.sessions) for w in workers]
        counters = sum((w.counters for w in workers), Counter())
        again = await store.claim_dispatch("late", min_idle_ms=0)  # nothing is left pending
        for w in workers:  # (a leave order goes to either worker of the group: stop them instead)
            await w.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.aclose()
        return died, sessions, counters, again

    died, sessions, counters, again = asyncio.run(main())
    assert sorted(sid for sid, _, _ in started) == ["ses0", "ses1"], "each order ran exactly once"
    assert not set(sessions[0]) & set(sessions[1]) and set(sessions[0]) | set(sessions[1]) == {"ses0", "ses1"}
    (claimed_at,) = [when for sid, _, when in started if sid == "ses0"]
    # Redis keeps idle times in whole milliseconds: allow that rounding, nothing more.
    assert claimed_at - died >= min_idle_s - 0.002, "taken over only once idle for min_idle"
    assert {target for _, target, _ in started} == {"serve:9000"}, "AF_BRIDGE_GRPC_TARGET replaces the order's"
    assert counters["orders_claimed"] == 2 and counters["joins_expired"] == 1
    assert counters["sessions_started"] == 2 and counters["orders_join"] == 3
    assert again == []
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xpending(f"{prefix}:bridge:dispatch", "bridges")["pending"] == 0
    finally:
        client.close()


def test_a_leave_read_by_a_worker_not_holding_the_session_is_forwarded_to_its_owner(redis_url, prefix):
    """b1 holds ses0 and is full, so the group hands the leave to b2: b2 forwards it to b1's inbox
    and b1 ends the session (before, b2 acked and dropped it, and the session went on)."""
    servers = {"room0": MemoryServer("room0")}

    def worker(store: SessionStore, bridge_id: str, max_sessions: int) -> BridgeWorker:
        settings = WorkerSettings(redis_url=redis_url, redis_prefix=prefix, bridge_id=bridge_id,
                                  max_sessions=max_sessions, block_ms=100, claim_idle_ms=0)  # fmt: skip
        return BridgeWorker(
            store,
            settings,
            room_factory=lambda o: servers[o.room].room(o.avatar_identity, rtc.ParticipantKind.PARTICIPANT_KIND_AGENT),
            backend=FakeBackend(),
        )

    async def main():
        store = SessionStore(redis_url, prefix, timeout_s=5.0)
        await store.ensure_dispatch_group()
        owner, other = worker(store, "b1", 1), worker(store, "b2", 4)
        tasks = [asyncio.create_task(owner.run())]
        await store.dispatch_bridge("join", join_order(0))
        await wait_until(lambda: "ses0" in owner.sessions, 10)
        session = owner.sessions["ses0"][0]
        recorded = await store.bridge_owner("ses0")
        tasks.append(asyncio.create_task(other.run()))  # b1 is full: the group's next order is b2's
        await store.dispatch_bridge("leave", {"session_id": "ses0", "reason": "stopped"})
        with contextlib.suppress(TimeoutError):
            await wait_until(lambda: not owner.sessions, 10)
        held_after = sorted(owner.sessions)
        await asyncio.sleep(0.3)  # the ended session's owner record is deleted
        after = await store.bridge_owner("ses0")
        inbox = await store.read_bridge_inbox("b1")
        for w in (owner, other):
            await w.aclose()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await store.aclose()
        return session, recorded, held_after, after, inbox, owner.counters, other.counters

    session, recorded, held_after, after, inbox, owner_counters, other_counters = asyncio.run(main())
    assert recorded == "b1"
    assert other_counters["orders_leave"] == 1 and other_counters["leaves_forwarded"] == 1
    assert owner_counters["orders_leave"] == 0 and owner_counters["forwarded_leave"] == 1
    assert held_after == [] and session.reason == "left: stopped"  # the owner ended it
    assert after is None and inbox == []  # its record went with it; the inbox holds nothing
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.xpending(f"{prefix}:bridge:dispatch", "bridges")["pending"] == 0
    finally:
        client.close()


def test_worker_settings_from_env(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://r:6379/3")
    monkeypatch.setenv("AF_REDIS_PREFIX", "p1")
    monkeypatch.setenv("AF_BRIDGE_ID", "b7")
    monkeypatch.setenv("AF_BRIDGE_MAX_SESSIONS", "16")
    monkeypatch.setenv("AF_BRIDGE_PORT", "9001")
    s = WorkerSettings.from_env()
    assert (s.redis_url, s.redis_prefix, s.bridge_id, s.max_sessions, s.port) == (
        "redis://r:6379/3",
        "p1",
        "b7",
        16,
        9001,
    )
    assert (s.claim_idle_ms, s.grpc_target) == (60_000, "")
    monkeypatch.setenv("AF_BRIDGE_CLAIM_IDLE_MS", "90000")
    monkeypatch.setenv("AF_BRIDGE_GRPC_TARGET", "serve:9000")
    assert (WorkerSettings.from_env().claim_idle_ms, WorkerSettings.from_env().grpc_target) == (90_000, "serve:9000")
    monkeypatch.setenv("AF_BRIDGE_CLAIM_IDLE_MS", "5000")  # shorter than a live worker's join may take
    with pytest.raises(ValueError, match="AF_BRIDGE_CLAIM_IDLE_MS"):
        WorkerSettings.from_env()
    monkeypatch.setenv("AF_BRIDGE_CLAIM_IDLE_MS", "0")
    assert WorkerSettings.from_env().claim_idle_ms == 0
    monkeypatch.setenv("AF_BRIDGE_MAX_SESSIONS", "many")
    with pytest.raises(ValueError, match="AF_BRIDGE_MAX_SESSIONS"):
        WorkerSettings.from_env()
    assert run_virtual  # the harness runs on the virtual clock too
