"""Session records: create, read, list, keep alive, close, and ask which are gone.

Liveness. A session is alive while its heartbeat key (P:session:{sid}:heartbeat) exists; whoever
drives the session (the ingress, and the owner with every block it appends) refreshes it. Each
refresh also moves the session's deadline in P:session-deadlines, the index the reaper reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.records import ReapedSession, SessionRecord
from services.store.scripts import raise_for_session
from services.store.validation import (
    MAX_OPTIONS_BYTES,
    MAX_ROOM_CHARS,
    check_ids,
    check_status,
    ttl_ms,
)
from services.wire.errors import (
    CapacityExceededError,
    FailedPreconditionError,
    SessionNotFoundError,
    TenantMismatchError,
    ValidationError,
)
from services.wire.ids import check_id


def session_record(data: dict[bytes, bytes], session_id: str, tenant_id: str) -> SessionRecord:
    """The record from its hash, if it exists and is the tenant's (else the error callers expect)."""
    if not data:
        raise SessionNotFoundError(session_id)
    record = SessionRecord.from_hash(data)
    if record.tenant_id != tenant_id:
        raise TenantMismatchError("session_id", session_id, tenant_id)
    return record


class SessionOps:
    """The session-record operations of SessionStore."""

    client: StoreClient
    keys: KeySchema
    heartbeat_ttl_s: float

    async def create(
        self,
        session_id: str,
        tenant_id: str,
        avatar_id: str,
        options: dict[str, Any] | None = None,
        room: str = "",
        status: str = "created",
        max_tenant_sessions: int = 0,
    ) -> SessionRecord:
        """A new session record with a fresh heartbeat. max_tenant_sessions > 0: the tenant's quota."""
        check_ids(session_id, tenant_id)
        check_id("avatar_id", avatar_id)
        check_status(status)
        if not isinstance(room, str) or len(room) > MAX_ROOM_CHARS or not room.isprintable():
            raise ValidationError("room", f"expected at most {MAX_ROOM_CHARS} printable characters, got {room!r}")
        try:
            # sort_keys: the same options always store as the same bytes.
            options_json = json.dumps(options or {}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError("options", f"not JSON-serialisable ({exc})") from exc
        if len(options_json) > MAX_OPTIONS_BYTES:
            raise ValidationError("options", f"{len(options_json)} bytes of JSON exceeds {MAX_OPTIONS_BYTES}")
        keys = [
            self.keys.session(session_id),
            self.keys.heartbeat(session_id),
            self.keys.deadlines,
            self.keys.tenant_sessions(tenant_id),
        ]
        ttl = ttl_ms(self.heartbeat_ttl_s)
        args = [session_id, tenant_id, avatar_id, room, status, options_json, ttl, max_tenant_sessions]
        reply = await self.client.script("create", keys, args)
        if reply[0] == "exists":
            raise FailedPreconditionError(f"session_id: a session {session_id!r} already exists")
        if reply[0] == "full":
            limit = max_tenant_sessions
            raise CapacityExceededError(f"tenant_id: tenant {tenant_id!r} has its limit of {limit} sessions")
        return await self.get(session_id, tenant_id)

    async def get(self, session_id: str, tenant_id: str) -> SessionRecord:
        check_ids(session_id, tenant_id)
        data = await self.client.run("get", lambda: self.client.redis.hgetall(self.keys.session(session_id)))
        return session_record(data, session_id, tenant_id)

    async def list_sessions(self, tenant_id: str) -> list[SessionRecord]:
        """The tenant's sessions, by creation time."""
        check_id("tenant_id", tenant_id)
        redis = self.client.redis
        ids = await self.client.run("list_sessions", lambda: redis.smembers(self.keys.tenant_sessions(tenant_id)))
        if not ids:
            return []

        async def fetch() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self.keys.session(sid.decode()))
                return await pipe.execute()

        # A session closed between the two reads has an empty hash: skip it.
        records = [SessionRecord.from_hash(d) for d in await self.client.run("list_sessions", fetch) if d]
        return sorted((r for r in records if r.tenant_id == tenant_id), key=lambda r: (r.created_ms, r.session_id))

    async def heartbeat(self, session_id: str, tenant_id: str, status: str | None = None) -> None:
        """Keep the session alive for another heartbeat TTL (optionally setting its status)."""
        check_ids(session_id, tenant_id)
        if status is not None:
            check_status(status)
        keys = [self.keys.session(session_id), self.keys.heartbeat(session_id), self.keys.deadlines]
        args = [session_id, tenant_id, ttl_ms(self.heartbeat_ttl_s), status or ""]
        reply = await self.client.script("heartbeat", keys, args)
        raise_for_session(reply, session_id, tenant_id)

    async def close(self, session_id: str, tenant_id: str) -> ReapedSession:
        """Delete the session now (every key), announcing it on the reaped channel."""
        check_ids(session_id, tenant_id)
        args = [self.keys.prefix, session_id, tenant_id]
        reply = await self.client.script("close", [self.keys.session(session_id)], args)
        raise_for_session(reply, session_id, tenant_id)
        return ReapedSession.from_json(reply[1])

    async def missing(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these sessions no longer exist (reaped or closed): their caches can go."""
        ids = list(session_ids)
        if not ids:
            return set()

        async def check() -> list[Any]:
            async with self.client.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.exists(self.keys.session(sid))
                return await pipe.execute()

        present = await self.client.run("missing", check)
        return {sid for sid, exists in zip(ids, present, strict=True) if not exists}
