"""The bridge dispatch stream (P:bridge:dispatch): join/leave orders for LiveKit bridge workers.

The gateway appends one entry per order (`dispatch_bridge`); bridge workers read them through the
consumer group `DISPATCH_GROUP` (`read_dispatch`, then `ack_dispatch` once an order is carried
out), so each order is taken by one worker and an order a crashed worker took stays pending until
another claims it (`claim_dispatch`, XAUTOCLAIM once it has been idle long enough). The entry
format is the gateway's contract with the bridge:
`services.gateway.livekit` and docs/gateway.md.

A leave order may reach any worker of the group, not the one holding the session. So a worker
records the sessions it holds (`set_bridge_owner`, P:bridge:owner:{sid} with a TTL it refreshes),
and a worker that reads a leave for a session it does not hold forwards it to the owner's inbox
(`forward_to_bridge`, the stream P:bridge:inbox:{bid}), which the owner polls
(`read_bridge_inbox`, entries deleted once read).
"""

from __future__ import annotations

import json
from typing import Any

from redis import exceptions as redis_errors

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.wire.errors import ValidationError

DISPATCH_GROUP = "bridges"
DISPATCH_MAXLEN = 10_000  # entries kept (approximately): orders are consumed within seconds
INBOX_MAXLEN = 1_000  # a worker's inbox: forwarded leaves, read within a second
ACTIONS = ("join", "leave")


class DispatchOps:
    """The bridge-dispatch operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def ensure_dispatch_group(self) -> None:
        """The stream and its consumer group (from the stream's start), created once; idempotent."""
        stream = self.keys.bridge_dispatch

        async def create() -> None:
            try:
                await self.client.redis.xgroup_create(stream, DISPATCH_GROUP, id="0", mkstream=True)
            except redis_errors.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self.client.run("ensure_dispatch_group", create)

    async def dispatch_bridge(self, action: str, order: dict[str, Any]) -> str:
        """Append one order; returns its entry id (the dispatch id)."""
        if action not in ACTIONS:
            raise ValidationError("action", f"got {action!r}; expected one of {ACTIONS}")
        fields = {"action": action, "order": json.dumps(order, sort_keys=True)}
        stream = self.keys.bridge_dispatch
        entry = await self.client.run(
            "dispatch_bridge",
            lambda: self.client.redis.xadd(stream, fields, maxlen=DISPATCH_MAXLEN, approximate=True),
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def read_dispatch(
        self, consumer: str, count: int = 10, block_ms: int | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """New orders for `consumer` of the group: (entry id, action, order), oldest first."""
        stream = self.keys.bridge_dispatch
        reply = await self.client.run(
            "read_dispatch",
            lambda: self.client.redis.xreadgroup(DISPATCH_GROUP, consumer, {stream: ">"}, count=count, block=block_ms),
        )
        return [_order(entry_id, fields) for _stream, entries in reply or [] for entry_id, fields in entries]

    async def claim_dispatch(
        self, consumer: str, min_idle_ms: int, count: int = 10
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Orders another consumer read but has not acked for `min_idle_ms`, now `consumer`'s
        (XAUTOCLAIM from the start of the group's pending list): (entry id, action, order), as
        `read_dispatch` returns them. A claim resets an entry's idle time, so two claimers never
        get the same entry within `min_idle_ms`. Pending entries the stream no longer holds
        (trimmed) are dropped from the pending list by Redis (7+) and not returned."""
        stream = self.keys.bridge_dispatch
        redis = self.client.redis
        reply = await self.client.run(
            "claim_dispatch",
            lambda: redis.xautoclaim(stream, DISPATCH_GROUP, consumer, int(min_idle_ms), "0-0", count=count),
        )
        entries = reply[1] if reply and len(reply) > 1 else []
        return [_order(entry_id, fields) for entry_id, fields in entries if entry_id is not None and fields]

    async def ack_dispatch(self, *entry_ids: str) -> int:
        stream = self.keys.bridge_dispatch
        redis = self.client.redis
        acked = await self.client.run("ack_dispatch", lambda: redis.xack(stream, DISPATCH_GROUP, *entry_ids))
        return int(acked)

    # -- session owners and forwarded orders ------------------------------------------------------

    async def set_bridge_owner(self, session_id: str, bridge_id: str, ttl_s: float) -> None:
        """`bridge_id` holds the session's room; the record expires unless refreshed within `ttl_s`
        (a dead worker's sessions stop naming it)."""
        key, ttl_ms = self.keys.bridge_owner(session_id), max(1, int(ttl_s * 1000))
        await self.client.run("set_bridge_owner", lambda: self.client.redis.set(key, bridge_id, px=ttl_ms))

    async def bridge_owner(self, session_id: str) -> str | None:
        """The bridge id holding the session, or None."""
        key = self.keys.bridge_owner(session_id)
        owner = await self.client.run("bridge_owner", lambda: self.client.redis.get(key))
        return owner.decode() if isinstance(owner, bytes) else owner

    async def clear_bridge_owner(self, session_id: str, bridge_id: str) -> None:
        """The session ended on `bridge_id`: its record goes, unless another worker holds it now."""
        if await self.bridge_owner(session_id) == bridge_id:
            key = self.keys.bridge_owner(session_id)
            await self.client.run("clear_bridge_owner", lambda: self.client.redis.delete(key))

    async def forward_to_bridge(self, bridge_id: str, action: str, order: dict[str, Any]) -> str:
        """Append one order to `bridge_id`'s inbox; returns its entry id."""
        if action not in ACTIONS:
            raise ValidationError("action", f"got {action!r}; expected one of {ACTIONS}")
        fields = {"action": action, "order": json.dumps(order, sort_keys=True)}
        stream = self.keys.bridge_inbox(bridge_id)
        entry = await self.client.run(
            "forward_to_bridge",
            lambda: self.client.redis.xadd(stream, fields, maxlen=INBOX_MAXLEN, approximate=True),
        )
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def read_bridge_inbox(self, bridge_id: str, count: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """The orders forwarded to `bridge_id`, oldest first, deleted from the inbox as they are
        returned (a forwarded leave is carried out once; lost with its worker, as is its session)."""
        stream = self.keys.bridge_inbox(bridge_id)
        redis = self.client.redis
        reply = await self.client.run("read_bridge_inbox", lambda: redis.xrange(stream, count=count))
        orders = [_order(entry_id, fields) for entry_id, fields in reply or []]
        if orders:
            await self.client.run("read_bridge_inbox", lambda: redis.xdel(stream, *(e for e, _, _ in orders)))
        return orders


def _order(entry_id: bytes | str, fields: dict[bytes, bytes]) -> tuple[str, str, dict[str, Any]]:
    text = {k.decode(): v.decode() for k, v in fields.items()}
    entry = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
    return entry, text["action"], json.loads(text["order"])
