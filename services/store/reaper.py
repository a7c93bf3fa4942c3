"""Reaping: removing sessions whose heartbeat expired, forgetting dead replicas, announcing both.

Reaping. `reap()` takes sessions whose deadline passed from the deadline index, confirms in Redis
that their heartbeat key is gone, and deletes every key of each (record, heartbeat, history,
state, index entries), publishing it on P:reaped so owners free their caches (`missing()` is the
polling alternative). Dead replicas that own nothing are forgotten. `run_reaper` does this on an
interval; any number of processes may run it, since each script is atomic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from services.store.client import UNAVAILABLE, StoreClient
from services.store.keys import KeySchema
from services.store.records import ReapedSession, ReapResult
from services.wire.errors import StoreUnavailable

log = logging.getLogger(__name__)

REAP_BATCH = 200  # sessions per script call: bounds how long one call holds Redis


class ReaperOps:
    """The reaping operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def reap(self, now: float | None = None, max_batches: int = 50) -> ReapResult:
        """Delete every session whose heartbeat expired (deadline <= now, heartbeat key gone).

        now: unix seconds bounding which deadlines are looked at; None: the Redis clock. A
        session whose heartbeat key still exists is never reaped, whatever `now` says.
        """
        now_arg = "" if now is None else str(int(now * 1000))
        sessions: list[ReapedSession] = []
        for _ in range(max_batches):
            reply = await self.client.script("reap", [self.keys.deadlines], [self.keys.prefix, now_arg, REAP_BATCH])
            sessions += [ReapedSession.from_json(info) for info in reply[1:]]
            if int(reply[0]) < REAP_BATCH:  # fewer candidates than a batch: the index is drained
                break
        dead = await self.client.script("reap_replicas", [self.keys.replicas], [self.keys.prefix])
        for session in sessions:
            log.info("reaped session %s of tenant %s (owner %r)", session.session_id, session.tenant_id, session.owner)
        return ReapResult(sessions, list(dead))

    async def reaped_events(self) -> AsyncIterator[ReapedSession]:
        """Reaped and closed sessions as they happen (pub/sub; delivery is best effort, so
        owners should also poll `missing()` for the sessions they cache)."""
        pubsub = self.client.redis.pubsub()
        try:
            await self.client.run("subscribe", lambda: pubsub.subscribe(self.keys.reaped_channel))
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield ReapedSession.from_json(message["data"])
        except UNAVAILABLE as exc:
            raise self.client.unavailable("reaped_events") from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()


async def run_reaper(
    store: ReaperOps,
    interval_s: float,
    on_reaped: Callable[[ReapResult], Awaitable[None]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Reap every interval until `stop` is set. Redis outages are logged and retried."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            result = await store.reap()
            if on_reaped is not None and (result.sessions or result.dead_replicas):
                await on_reaped(result)
        except StoreUnavailable as exc:
            log.warning("reaper: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
