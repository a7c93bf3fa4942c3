"""Session records: create, read, list, keep alive, stop, close, and ask which are gone.

Lifecycle (`SessionRecord.status`, `validation.STATUSES`): the gateway creates a session "pending";
the ingress streaming it sets "active"; `request_stop` sets "stopping", and the ingress ends the
stream after its current block and closes the session; `close` deletes every key of it ("closed",
announced on the reaped channel). The ingress writes the session's live figures per block
(`set_figures`, `records.SESSION_FIGURES`).

Tenants. Every operation names the tenant; another tenant's session answers exactly as an unknown
one (SessionNotFoundError), so ids do not leak. `create` enforces the tenant's
max_concurrent_sessions quota atomically (scripts._CREATE).

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
from services.store.quotas import DEFAULT_QUOTAS
from services.store.records import ReapedSession, SessionRecord
from services.store.scripts import raise_for_session
from services.store.validation import (
    MAX_OPTIONS_BYTES,
    MAX_ROOM_CHARS,
    check_figures,
    check_ids,
    check_status,
    ttl_ms,
)
from services.wire.errors import (
    FailedPreconditionError,
    QuotaExceededError,
    SessionNotFoundError,
    ValidationError,
)
from services.wire.ids import check_id


def session_record(data: dict[bytes, bytes], session_id: str, tenant_id: str) -> SessionRecord:
    """The record from its hash, if it exists and is the tenant's; SessionNotFoundError otherwise
    (the same error for another tenant's session as for an unknown one)."""
    if not data:
        raise SessionNotFoundError(session_id)
    record = SessionRecord.from_hash(data)
    if record.tenant_id != tenant_id:
        raise SessionNotFoundError(session_id)
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
        status: str = "pending",
        max_tenant_sessions: int | None = None,
    ) -> SessionRecord:
        """A new session record with a fresh heartbeat, counted against the tenant's quota.

        max_tenant_sessions None: the tenant's max_concurrent_sessions (its record's, else the
        default quota); an int > 0: that limit instead; 0: no limit. The count and the insert are
        one atomic step. Raises QuotaExceededError (limit "max_concurrent_sessions") when the tenant
        already has that many live sessions, FailedPreconditionError when the id exists.
        """
        check_ids(session_id, tenant_id)
        check_id("avatar_id", avatar_id)
        check_status(status)
        if max_tenant_sessions is not None and (
            isinstance(max_tenant_sessions, bool) or not isinstance(max_tenant_sessions, int) or max_tenant_sessions < 0
        ):
            raise ValidationError("max_tenant_sessions", f"got {max_tenant_sessions!r}; expected None or an int >= 0")
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
            self.keys.tenant(tenant_id),
        ]
        ttl = ttl_ms(self.heartbeat_ttl_s)
        limit = -1 if max_tenant_sessions is None else max_tenant_sessions
        args = [session_id, tenant_id, avatar_id, room, status, options_json, ttl, limit]
        args += [DEFAULT_QUOTAS.max_concurrent_sessions, self.keys.prefix]
        reply = await self.client.script("create", keys, args)
        if reply[0] == "exists":
            raise FailedPreconditionError(f"session_id: a session {session_id!r} already exists")
        if reply[0] == "full":
            open_, limit = int(reply[1]), int(reply[2])
            raise QuotaExceededError(
                "max_concurrent_sessions",
                f"tenant {tenant_id!r} has {open_} sessions open, its limit of {limit} concurrent sessions; "
                "stop one (or raise the quota) first",
            )
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

    async def request_stop(self, session_id: str, tenant_id: str) -> None:
        """Ask the session to end: status "stopping". The ingress streaming it ends the call with OK
        after the current block's frames and closes the session; a session nobody streams (still
        "pending") is reaped when its heartbeat lapses, or `close` it. Idempotent."""
        check_ids(session_id, tenant_id)
        reply = await self.client.script("request_stop", [self.keys.session(session_id)], [tenant_id])
        raise_for_session(reply, session_id, tenant_id)

    async def set_figures(self, session_id: str, tenant_id: str, figures: dict[str, float]) -> None:
        """Replace the session's live figures (records.SESSION_FIGURES; finite numbers, at most
        validation.MAX_FIGURES), read back as SessionRecord.figures."""
        check_ids(session_id, tenant_id)
        text = json.dumps(check_figures(figures), sort_keys=True)
        reply = await self.client.script("set_figures", [self.keys.session(session_id)], [tenant_id, text])
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
