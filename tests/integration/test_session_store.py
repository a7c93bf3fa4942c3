"""The Redis session store against a real Redis: records, heartbeats and reaping, ownership
compare-and-set, the history ring, tenant isolation, and Redis being down or restarting.

Uses AF_TEST_REDIS_URL (default redis://127.0.0.1:6379/12) with a unique key prefix per test;
when nothing answers there, a private redis-server is started for the module.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from services.common.config import Settings
from services.store import HistoryEntry, SessionStore
from services.wire.errors import (
    CapacityExceededError,
    FailedPreconditionError,
    FrameConflictError,
    OwnershipConflictError,
    OwnershipLostError,
    SessionNotFoundError,
    StoreUnavailable,
    ValidationError,
)
from tests.redis_support import free_port, keys_with, start_redis, stop_redis

pytestmark = pytest.mark.integration


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _error(operation: Awaitable[Any]) -> BaseException:
    try:
        await operation
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def store(url: str, prefix: str, **kwargs: Any) -> SessionStore:
    kwargs.setdefault("timeout_s", 1.0)
    return SessionStore(url, prefix=prefix, **kwargs)


# -- records and heartbeats ----------------------------------------------------------------------


def test_create_get_list_and_heartbeat(redis_url: str, prefix: str):
    async def main():
        async with store(redis_url, prefix, heartbeat_ttl_s=0.3) as s:
            record = await s.create("s1", "t1", "av1", {"block": 10, "nfe": 10}, room="room 1")
            assert (record.tenant_id, record.avatar_id, record.room, record.status) == (
                "t1",
                "av1",
                "room 1",
                "pending",
            )
            assert record.options == {"block": 10, "nfe": 10}
            assert (record.frame_cursor, record.owner, record.owner_epoch) == (0, "", 0)
            assert await s.get("s1", "t1") == record
            with pytest.raises(FailedPreconditionError, match="already exists"):
                await s.create("s1", "t1", "av1")
            with pytest.raises(SessionNotFoundError):
                await s.get("nope", "t1")

            for _ in range(4):  # 0.6 s in all: twice the TTL, kept alive by heartbeats
                await asyncio.sleep(0.15)
                await s.heartbeat("s1", "t1")
            await s.heartbeat("s1", "t1", status="active")
            assert (await s.reap()).sessions == []
            current = await s.get("s1", "t1")
            assert current.status == "active" and current.updated_ms >= record.updated_ms
            assert [r.session_id for r in await s.list_sessions("t1")] == ["s1"]
            assert await s.missing(["s1", "gone"]) == {"gone"}

        settings = Settings(redis_url=redis_url, redis_prefix=prefix, replica_id="gen-0")
        async with SessionStore.from_settings(settings) as from_settings:
            assert (await from_settings.get("s1", "t1")).status == "active"

    run(main())


def test_expired_session_is_reaped_with_every_key(redis_url: str, prefix: str):
    async def main():
        async with (
            store(redis_url, prefix, heartbeat_ttl_s=0.2) as short,
            store(redis_url, prefix, heartbeat_ttl_s=30) as long,
        ):
            await short.replica_heartbeat("r1")
            await short.create("dead", "t1", "av1")
            await long.create("alive", "t1", "av1")
            claim = await short.claim("dead", "t1", "r1")
            await short.append_block("dead", "t1", claim, 0, 10, b"latents", latest_state=b"state")
            assert keys_with(redis_url, f"{prefix}:session:dead*")

            events = short.reaped_events()
            next_event = asyncio.ensure_future(anext(events))
            await asyncio.sleep(0.3)  # the heartbeat of "dead" expires; "alive" stays
            # Even with a clock far ahead, only the session whose heartbeat key is gone is reaped.
            result = await long.reap(now=time.time() + 3600)
            assert [(r.session_id, r.tenant_id, r.owner, r.frame_cursor) for r in result.sessions] == [
                ("dead", "t1", "r1", 10)
            ]
            event = await asyncio.wait_for(next_event, 5)
            assert (event.session_id, event.owner, event.reason) == ("dead", "r1", "expired")
            await events.aclose()

            assert keys_with(redis_url, f"{prefix}:session:dead*") == []
            assert await long.owned_sessions("r1") == set()
            assert [r.session_id for r in await long.list_sessions("t1")] == ["alive"]
            assert await long.missing(["dead", "alive"]) == {"dead"}
            with pytest.raises(SessionNotFoundError):
                await short.heartbeat("dead", "t1")

            closed = await long.close("alive", "t1")
            assert (closed.session_id, closed.reason) == ("alive", "closed")
            await short.deregister_replica("r1")
            assert (await long.reap()).dead_replicas == ["r1"]
            assert keys_with(redis_url, f"{prefix}:*") == [], "every key of every session is gone"

    run(main())


# -- ownership -----------------------------------------------------------------------------------


def test_claim_is_a_compare_and_set_with_one_winner(redis_url: str, prefix: str):
    async def main():
        replicas = [f"r{i}" for i in range(8)]
        stores = [store(redis_url, prefix) for _ in replicas]  # one connection pool per claimer
        try:
            for s, replica in zip(stores, replicas, strict=True):
                await s.replica_heartbeat(replica)
            for round_ in range(5):
                sid = f"s{round_}"
                await stores[0].create(sid, "t1", "av1", max_tenant_sessions=0)  # no quota: 5 rounds
                results = await asyncio.gather(
                    *(s.claim(sid, "t1", r) for s, r in zip(stores, replicas, strict=True)), return_exceptions=True
                )
                winners = [r for r in results if not isinstance(r, BaseException)]
                assert len(winners) == 1, results
                assert all(isinstance(r, OwnershipConflictError) for r in results if r is not winners[0])
                record = await stores[0].get(sid, "t1")
                assert (record.owner, record.owner_epoch) == (winners[0].replica_id, 1)
                assert winners[0].transferred and not winners[0].resumed
        finally:
            for s in stores:
                await s.aclose()

    run(main())


def test_ownership_moves_when_the_owner_dies_and_fences_it(redis_url: str, prefix: str):
    async def main():
        async with (
            store(redis_url, prefix, replica_ttl_s=0.2) as one,
            store(redis_url, prefix, replica_ttl_s=30) as two,
        ):
            await one.create("s1", "t1", "av1")
            with pytest.raises(FailedPreconditionError, match="not alive"):
                await one.claim("s1", "t1", "r1")  # not registered yet
            await one.replica_heartbeat("r1")
            await two.replica_heartbeat("r2")
            first = await one.claim("s1", "t1", "r1")
            assert (await one.claim("s1", "t1", "r1")).transferred is False  # already ours
            await one.append_block("s1", "t1", first, 0, 10, b"block0")
            with pytest.raises(OwnershipConflictError, match="r1"):
                await two.claim("s1", "t1", "r2")

            await asyncio.sleep(0.3)  # r1 stops heartbeating and expires
            second = await two.claim("s1", "t1", "r2")
            assert second.resumed and (second.previous_owner, second.epoch) == ("r1", 2)
            with pytest.raises(OwnershipLostError):
                await one.append_block("s1", "t1", first, 10, 10, b"zombie")
            with pytest.raises(OwnershipLostError):
                await one.put_state("s1", "t1", first, b"zombie")
            snapshot = await two.snapshot("s1", "t1")
            assert snapshot.record.frame_cursor == 10 and [e.blob for e in snapshot.history] == [b"block0"]
            for wrong in (5, 20):  # an overlap or a gap
                with pytest.raises(FrameConflictError, match="expected the session's frame cursor 10"):
                    await two.append_block("s1", "t1", second, wrong, 10, b"wrong")
            assert await two.append_block("s1", "t1", second, 10, 10, b"block1") == 20
            assert await two.owned_sessions("r1") == set() and await two.owned_sessions("r2") == {"s1"}

            # A handoff while the owner lives, then a release.
            await one.replica_heartbeat("r3")
            third = await one.claim("s1", "t1", "r3", steal_from="r2")
            assert third.resumed and third.epoch == 3
            await one.release("s1", "t1", "r3", third.epoch)
            assert (await one.get("s1", "t1")).owner == ""
            with pytest.raises(OwnershipLostError):
                await one.release("s1", "t1", "r3", third.epoch)

            await two.create("s2", "t1", "av1")
            await two.create("s3", "t1", "av1")
            await two.claim("s2", "t1", "r2", max_sessions=1)  # r2 owned nothing since the handoff
            with pytest.raises(CapacityExceededError, match="already owns 1"):
                await two.claim("s3", "t1", "r2", max_sessions=1)

    run(main())


# -- history ---------------------------------------------------------------------------------------


def test_history_ring_is_bounded_and_frames_contiguous(redis_url: str, prefix: str):
    async def main():
        async with store(redis_url, prefix, history_blocks=4, max_entry_bytes=1000) as s:
            await s.replica_heartbeat("r1")
            await s.create("s1", "t1", "av1")
            claim = await s.claim("s1", "t1", "r1")
            cursor, firsts = 0, []
            for k in range(10):
                frames = 50 if k == 0 else 10  # the first window, then blocks
                firsts.append(cursor)
                cursor = await s.append_block("s1", "t1", claim, cursor, frames, f"b{k}".encode(), f"st{k}".encode())
            assert cursor == 140
            history = await s.history("s1", "t1")
            assert [(e.first_frame, e.num_frames, e.blob) for e in history] == [
                (firsts[k], 10, f"b{k}".encode()) for k in range(6, 10)
            ]
            # A retry of the last block (the reply was lost) changes nothing.
            assert await s.append_block("s1", "t1", claim, 130, 10, b"b9") == 140
            assert len(await s.history("s1", "t1")) == 4
            with pytest.raises(FrameConflictError):
                await s.append_block("s1", "t1", claim, 150, 10, b"gap")
            with pytest.raises(ValidationError, match="exceeds the limit of 1000") as info:
                await s.append_block("s1", "t1", claim, 140, 10, bytes(1001))
            assert info.value.field == "blob"
            state = (await s.snapshot("s1", "t1")).state
            assert state is not None and (state.frame_cursor, state.blob) == (140, b"st9")
            assert await s.put_state("s1", "t1", claim, b"newer") == 140
            assert (await s.snapshot("s1", "t1")).state.blob == b"newer"
            assert HistoryEntry.from_bytes(HistoryEntry(3, 4, b"x").to_bytes()) == HistoryEntry(3, 4, b"x")

    run(main())


# -- tenants ---------------------------------------------------------------------------------------


def test_tenants_cannot_see_or_touch_each_other(redis_url: str, prefix: str):
    async def main():
        async with store(redis_url, prefix) as s:
            await s.replica_heartbeat("r1")
            await s.create("a1", "tenantA", "av1")
            await s.create("a2", "tenantA", "av1")
            await s.create("b1", "tenantB", "av9")
            assert [r.session_id for r in await s.list_sessions("tenantA")] == ["a1", "a2"]
            assert [r.session_id for r in await s.list_sessions("tenantB")] == ["b1"]
            assert await s.list_sessions("tenantC") == []

            claim = await s.claim("a1", "tenantA", "r1")
            attempts = [
                s.get("a1", "tenantB"),
                s.heartbeat("a1", "tenantB"),
                s.claim("a1", "tenantB", "r1"),
                s.append_block("a1", "tenantB", claim, 0, 10, b"x"),
                s.put_state("a1", "tenantB", claim, b"x"),
                s.snapshot("a1", "tenantB"),
                s.release("a1", "tenantB", "r1", claim.epoch),
                s.close("a1", "tenantB"),
            ]
            unknown = await _error(s.get("never-made", "tenantB"))
            for attempt in attempts:  # another tenant's session answers exactly as an unknown id (no leak)
                error = await _error(attempt)
                assert isinstance(error, SessionNotFoundError), error
                assert str(error) == str(unknown).replace("never-made", "a1")
            record = await s.get("a1", "tenantA")
            assert (record.frame_cursor, record.owner, record.status) == (0, "r1", "pending")

            with pytest.raises(CapacityExceededError, match="limit of 2 concurrent sessions"):
                await s.create("a3", "tenantA", "av1", max_tenant_sessions=2)
            with pytest.raises(ValidationError) as info:
                await s.get("a1", "tenant:A")
            assert info.value.field == "tenant_id"

    run(main())


# -- Redis down --------------------------------------------------------------------------------------


def test_unreachable_redis_raises_store_unavailable_quickly():
    async def main():
        closed = free_port()
        silent = socket.socket()  # accepts connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        try:
            for url in (f"redis://:s3cret@127.0.0.1:{closed}/0", f"redis://127.0.0.1:{silent.getsockname()[1]}/0"):
                async with SessionStore(url, prefix="x", timeout_s=0.5) as s:
                    for operation in (s.get("s1", "t1"), s.create("s1", "t1", "a"), s.reap()):
                        started = time.monotonic()
                        with pytest.raises(StoreUnavailable) as info:
                            await operation
                        assert time.monotonic() - started < 2.0
                        assert "127.0.0.1" in str(info.value) and "s3cret" not in str(info.value)
        finally:
            silent.close()

    run(main())


def test_store_recovers_after_a_redis_restart(tmp_path: Path):
    async def main():
        port = free_port()
        process = start_redis(port, tmp_path)
        try:
            async with SessionStore(f"redis://127.0.0.1:{port}/0", prefix="af", timeout_s=0.5) as s:
                await s.replica_heartbeat("r1")
                await s.create("s1", "t1", "av1")
                claim = await s.claim("s1", "t1", "r1")
                stop_redis(process)
                with pytest.raises(StoreUnavailable):
                    await s.heartbeat("s1", "t1")
                process = start_redis(port, tmp_path)  # same data dir: the AOF brings the records back
                await s.replica_heartbeat("r1")  # stale pooled connections are replaced
                assert await s.append_block("s1", "t1", claim, 0, 10, b"after restart") == 10  # scripts reloaded
                assert (await s.get("s1", "t1")).frame_cursor == 10
        finally:
            stop_redis(process)

    run(main())
