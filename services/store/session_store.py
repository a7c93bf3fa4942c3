"""Redis session state. This module is the one owner of its schema: nothing else reads or
writes these keys.

Keys (P = `Settings.redis_prefix`, default "af"; every id matches [A-Za-z0-9_-]{1,64}):

    P:session:{sid}             hash    the session record: session_id, tenant_id, avatar_id, room,
                                        status, options (JSON), created_ms, updated_ms,
                                        frame_cursor (session frames generated so far), owner
                                        (replica id, "" when unowned), owner_epoch (+1 per claim:
                                        the fencing token writers must present), last_block_frame
    P:session:{sid}:heartbeat   string  "1" with a TTL of the heartbeat TTL: alive while it exists
    P:session:{sid}:history     list    bounded ring of per-block entries (RPUSH + LTRIM to N):
                                        `HistoryEntry` bytes (first frame, frame count, blob)
    P:session:{sid}:state       hash    the latest_state slot: frame_cursor, blob, updated_ms
    P:session-deadlines         zset    sid -> heartbeat deadline (ms): the reaper's index
    P:tenant:{tid}:sessions     set     the tenant's session ids
    P:tenant:{tid}:avatar:{aid} string  the avatar's portrait: the JPEG/PNG bytes as uploaded
                                        (MotionEncoder.EncodePortrait); decoders and generators
                                        rebuild the avatar's encoding from it. Durable, no TTL
    P:replica:{rid}:alive       string  TTL of the replica TTL: the replica is alive while it exists
    P:replica:{rid}:sessions    set     the session ids the replica owns
    P:replicas                  set     replica ids seen (dropped when dead and owning nothing)
    P:reaped                    channel pub/sub: JSON {session_id, tenant_id, owner, avatar_id,
                                        frame_cursor, reason} per reaped or closed session

Liveness. A session is alive while its heartbeat key exists; whoever drives the session (the
ingress, and the owner with every block it appends) refreshes it. A replica is alive while
its alive key exists; each generator replica refreshes its own. The two are separate on
purpose: when a replica dies its sessions are not reaped but claimed by another replica,
which rebuilds them from history and `state` and continues at `frame_cursor`.

Ownership. `claim` is a compare-and-set (one Lua script): it succeeds when the session is
unowned, already ours, its owner is dead, or its owner is the one named in `steal_from`
(a handoff when the replica set changes). Each successful transfer bumps `owner_epoch`;
`append_block` and `put_state` succeed only with the current owner and epoch, so a replica
that was presumed dead cannot write after another took over (it gets OwnershipLostError).

Frames. `append_block` requires the block's first frame to equal `frame_cursor` and advances
it; a retry of the last block is recognised and ignored, anything else is FrameConflictError. So
frame numbers are never skipped or repeated across a resume.

Reaping. `reap()` takes sessions whose deadline passed from the deadline index, confirms in
Redis that their heartbeat key is gone, and deletes every key of each (record, heartbeat,
history, state, index entries), publishing it on P:reaped so owners free their caches
(`missing()` is the polling alternative). Dead replicas that own nothing are forgotten.

All times come from the Redis server clock (TIME inside the scripts). Every operation is
bounded by `timeout_s`; an unreachable or silent Redis raises StoreUnavailable. The scripts
address keys built from the prefix, so this needs a single Redis primary (no Redis Cluster).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from services.common.config import Settings
from services.wire.errors import (
    CapacityExceededError,
    FailedPreconditionError,
    FrameConflictError,
    NotFoundError,
    OwnershipConflictError,
    OwnershipLostError,
    SessionNotFoundError,
    StoreUnavailable,
    TenantMismatchError,
    ValidationError,
)
from services.wire.ids import check_id

log = logging.getLogger(__name__)
T = TypeVar("T")

STATUSES = ("created", "active", "ended")
MAX_OPTIONS_BYTES = 4096
MAX_ROOM_CHARS = 256
MAX_ENTRY_BYTES = 1 << 20  # one history entry's blob
MAX_STATE_BYTES = 64 << 20  # the latest_state blob
MAX_PORTRAIT_BYTES = 1 << 20  # one avatar portrait (limits.proto MAX_IMAGE_BYTES)
REAP_BATCH = 200

__all__ = [
    "Claim",
    "HistoryEntry",
    "ReapResult",
    "ReapedSession",
    "ResumeSnapshot",
    "SessionRecord",
    "SessionStore",
    "StateSnapshot",
    "StoreUnavailable",
    "run_reaper",
]


# -- records -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    tenant_id: str
    avatar_id: str
    room: str
    status: str
    options: dict[str, Any]
    created_ms: int
    updated_ms: int
    frame_cursor: int  # session frames generated so far = the first frame of the next block
    owner: str  # replica id, "" when unowned
    owner_epoch: int

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> SessionRecord:
        text = {k.decode(): v.decode() for k, v in data.items() if k != b"options"}
        return cls(
            session_id=text["session_id"],
            tenant_id=text["tenant_id"],
            avatar_id=text["avatar_id"],
            room=text["room"],
            status=text["status"],
            options=json.loads(data[b"options"]),
            created_ms=int(text["created_ms"]),
            updated_ms=int(text["updated_ms"]),
            frame_cursor=int(text["frame_cursor"]),
            owner=text["owner"],
            owner_epoch=int(text["owner_epoch"]),
        )


_ENTRY_HEADER = struct.Struct(">4sqI")  # magic, first frame (int64), frame count (uint32)
_ENTRY_MAGIC = b"AFH1"


@dataclass(frozen=True)
class HistoryEntry:
    """One block of a session's history: frames [first_frame, first_frame + num_frames)."""

    first_frame: int
    num_frames: int
    blob: bytes  # what the generator needs to rebuild from (its format is the generator's)

    def to_bytes(self) -> bytes:
        return _ENTRY_HEADER.pack(_ENTRY_MAGIC, self.first_frame, self.num_frames) + self.blob

    @classmethod
    def from_bytes(cls, data: bytes) -> HistoryEntry:
        if len(data) < _ENTRY_HEADER.size or data[:4] != _ENTRY_MAGIC:
            raise ValueError("history entry: not a HistoryEntry (bad header)")
        _, first, count = _ENTRY_HEADER.unpack_from(data)
        return cls(first, count, data[_ENTRY_HEADER.size :])


@dataclass(frozen=True)
class StateSnapshot:
    frame_cursor: int  # the session's frame cursor when the blob was written
    blob: bytes
    updated_ms: int


@dataclass(frozen=True)
class ResumeSnapshot:
    """Everything a replica needs to take a session over, read atomically."""

    record: SessionRecord
    history: list[HistoryEntry]  # oldest first
    state: StateSnapshot | None


@dataclass(frozen=True)
class Claim:
    session_id: str
    replica_id: str
    epoch: int  # present it to append_block / put_state / release
    previous_owner: str  # "" when the session was unowned
    transferred: bool  # ownership moved here now (False: we already owned it)

    @property
    def resumed(self) -> bool:
        """Another replica owned the session: rebuild the cache from history before generating.

        Advisory: a replica that does not hold the session's cache rebuilds it regardless (a
        claim whose reply was lost and retried reads as already owned)."""
        return self.transferred and self.previous_owner != ""


@dataclass(frozen=True)
class ReapedSession:
    session_id: str
    tenant_id: str
    owner: str
    avatar_id: str
    frame_cursor: int
    reason: str  # "expired" or "closed"

    @classmethod
    def from_json(cls, text: str | bytes) -> ReapedSession:
        data = json.loads(text)
        return cls(
            data["session_id"],
            data["tenant_id"],
            data["owner"],
            data["avatar_id"],
            int(data["frame_cursor"]),
            data["reason"],
        )


@dataclass(frozen=True)
class ReapResult:
    sessions: list[ReapedSession] = field(default_factory=list)
    dead_replicas: list[str] = field(default_factory=list)


# -- Lua ---------------------------------------------------------------------------------------

_LUA_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format('%d', x) end
local function purge(P, sid, reason)
  local base = P .. ':session:' .. sid
  local rec = redis.call('HMGET', base, 'tenant_id', 'owner', 'avatar_id', 'frame_cursor')
  redis.call('DEL', base, base .. ':heartbeat', base .. ':history', base .. ':state')
  redis.call('ZREM', P .. ':session-deadlines', sid)
  if rec[1] then redis.call('SREM', P .. ':tenant:' .. rec[1] .. ':sessions', sid) end
  if rec[2] and rec[2] ~= '' then redis.call('SREM', P .. ':replica:' .. rec[2] .. ':sessions', sid) end
  local info = cjson.encode({session_id = sid, tenant_id = rec[1] or '', owner = rec[2] or '',
    avatar_id = rec[3] or '', frame_cursor = tonumber(rec[4] or '0'), reason = reason})
  redis.call('PUBLISH', P .. ':reaped', info)
  return info
end
"""

# KEYS: record, heartbeat, deadlines, tenant set
# ARGV: sid, tenant, avatar, room, status, options, ttl_ms, max_tenant_sessions
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local limit = tonumber(ARGV[8])
if limit > 0 and redis.call('SCARD', KEYS[4]) >= limit then return {'full'} end
local now = now_ms()
redis.call('HSET', KEYS[1], 'session_id', ARGV[1], 'tenant_id', ARGV[2], 'avatar_id', ARGV[3],
  'room', ARGV[4], 'status', ARGV[5], 'options', ARGV[6], 'created_ms', int(now), 'updated_ms', int(now),
  'frame_cursor', '0', 'owner', '', 'owner_epoch', '0', 'last_block_frame', '-1')
redis.call('SET', KEYS[2], '1', 'PX', ARGV[7])
redis.call('ZADD', KEYS[3], int(now + tonumber(ARGV[7])), ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return {'ok'}
"""

# KEYS: record, heartbeat, deadlines     ARGV: sid, tenant, ttl_ms, status ('' = unchanged)
_HEARTBEAT = """
local tenant = redis.call('HGET', KEYS[1], 'tenant_id')
if not tenant then return {'not_found'} end
if tenant ~= ARGV[2] then return {'tenant_mismatch'} end
local now = now_ms()
redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
redis.call('ZADD', KEYS[3], int(now + tonumber(ARGV[3])), ARGV[1])
redis.call('HSET', KEYS[1], 'updated_ms', int(now))
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[4]) end
return {'ok'}
"""

# KEYS: record     ARGV: prefix, sid, tenant, replica, steal_from, max_sessions
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'owner', 'owner_epoch')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[3] then return {'tenant_mismatch'} end
local P, sid, replica = ARGV[1], ARGV[2], ARGV[4]
local owner, epoch = rec[2] or '', tonumber(rec[3] or '0')
if redis.call('EXISTS', P .. ':replica:' .. replica .. ':alive') == 0 then
  return {'not_registered', int(epoch), owner}
end
if owner == replica then return {'owned', int(epoch), owner} end
if owner ~= '' and owner ~= ARGV[5] and redis.call('EXISTS', P .. ':replica:' .. owner .. ':alive') == 1 then
  return {'conflict', int(epoch), owner}
end
local mine = P .. ':replica:' .. replica .. ':sessions'
local limit = tonumber(ARGV[6])
if limit > 0 and redis.call('SCARD', mine) >= limit then return {'full', int(epoch), owner} end
if owner ~= '' then redis.call('SREM', P .. ':replica:' .. owner .. ':sessions', sid) end
redis.call('SADD', mine, sid)
redis.call('SADD', P .. ':replicas', replica)
epoch = epoch + 1
redis.call('HSET', KEYS[1], 'owner', replica, 'owner_epoch', int(epoch), 'updated_ms', int(now_ms()))
return {'claimed', int(epoch), owner}
"""

# KEYS: record     ARGV: prefix, sid, tenant, replica, epoch
_RELEASE = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'owner', 'owner_epoch')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[3] then return {'tenant_mismatch'} end
if rec[2] ~= ARGV[4] or rec[3] ~= ARGV[5] then return {'not_owner', rec[2] or '', rec[3] or '0'} end
redis.call('SREM', ARGV[1] .. ':replica:' .. ARGV[4] .. ':sessions', ARGV[2])
redis.call('HSET', KEYS[1], 'owner', '', 'updated_ms', int(now_ms()))
return {'ok'}
"""

# KEYS: record, history, state, heartbeat, deadlines
# ARGV: sid, tenant, replica, epoch, first_frame, num_frames, entry, history_len, has_state, state, ttl_ms
_APPEND = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'owner', 'owner_epoch', 'frame_cursor', 'last_block_frame')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[2] then return {'tenant_mismatch'} end
if rec[2] ~= ARGV[3] or rec[3] ~= ARGV[4] then return {'not_owner', rec[2] or '', rec[3] or '0'} end
local cursor, first, n = tonumber(rec[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if first ~= cursor then
  if first + n == cursor and rec[5] == ARGV[5] then return {'duplicate', int(cursor)} end
  return {'frame_conflict', int(cursor)}
end
local now = now_ms()
cursor = first + n
redis.call('RPUSH', KEYS[2], ARGV[7])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[8]), -1)
if ARGV[9] == '1' then
  redis.call('HSET', KEYS[3], 'frame_cursor', int(cursor), 'blob', ARGV[10], 'updated_ms', int(now))
end
redis.call('HSET', KEYS[1], 'frame_cursor', int(cursor), 'last_block_frame', ARGV[5], 'updated_ms', int(now))
redis.call('SET', KEYS[4], '1', 'PX', ARGV[11])
redis.call('ZADD', KEYS[5], int(now + tonumber(ARGV[11])), ARGV[1])
return {'ok', int(cursor)}
"""

# KEYS: record, state     ARGV: tenant, replica, epoch, blob
_PUT_STATE = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'owner', 'owner_epoch', 'frame_cursor')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[1] then return {'tenant_mismatch'} end
if rec[2] ~= ARGV[2] or rec[3] ~= ARGV[3] then return {'not_owner', rec[2] or '', rec[3] or '0'} end
redis.call('HSET', KEYS[2], 'frame_cursor', rec[4], 'blob', ARGV[4], 'updated_ms', int(now_ms()))
return {'ok', rec[4]}
"""

# KEYS: record     ARGV: prefix, sid, tenant
_CLOSE = """
local tenant = redis.call('HGET', KEYS[1], 'tenant_id')
if not tenant then return {'not_found'} end
if tenant ~= ARGV[3] then return {'tenant_mismatch'} end
return {'ok', purge(ARGV[1], ARGV[2], 'closed')}
"""

# KEYS: deadlines     ARGV: prefix, now_ms ('' = Redis clock), batch
# Returns {examined, info...}: sessions past their deadline whose heartbeat key is gone are purged;
# a candidate whose heartbeat still exists (its deadline was early) is re-indexed.
_REAP = """
local P = ARGV[1]
local now = ARGV[2] ~= '' and tonumber(ARGV[2]) or now_ms()
local sids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#sids}
for _, sid in ipairs(sids) do
  local ttl = redis.call('PTTL', P .. ':session:' .. sid .. ':heartbeat')
  if ttl == -2 then
    table.insert(out, purge(P, sid, 'expired'))
  else
    if ttl < 0 then ttl = 60000 end
    redis.call('ZADD', KEYS[1], int(now_ms() + ttl), sid)
  end
end
return out
"""

# KEYS: replicas     ARGV: prefix
_REAP_REPLICAS = """
local dead = {}
for _, rid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local base = ARGV[1] .. ':replica:' .. rid
  if redis.call('EXISTS', base .. ':alive') == 0 and redis.call('SCARD', base .. ':sessions') == 0 then
    redis.call('SREM', KEYS[1], rid)
    table.insert(dead, rid)
  end
end
return dead
"""

_SCRIPTS = {
    "create": _CREATE,
    "heartbeat": _HEARTBEAT,
    "claim": _CLAIM,
    "release": _RELEASE,
    "append": _APPEND,
    "put_state": _PUT_STATE,
    "close": _CLOSE,
    "reap": _REAP,
    "reap_replicas": _REAP_REPLICAS,
}

_UNAVAILABLE = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # talking to a replica during failover
    TimeoutError,
    OSError,
)


# -- validation --------------------------------------------------------------------------------


def _check_ids(session_id: str, tenant_id: str) -> None:
    check_id("session_id", session_id)
    check_id("tenant_id", tenant_id)


def _check_blob(name: str, value: bytes, limit: int) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationError(name, f"expected bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise ValidationError(name, f"{len(value)} bytes exceeds the limit of {limit} bytes")
    return bytes(value)


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


# -- the store ---------------------------------------------------------------------------------


class SessionStore:
    """Async access to the session state in Redis (see the module docstring for the schema)."""

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        prefix: str = "af",
        timeout_s: float = 2.0,
        heartbeat_ttl_s: float = 15.0,
        replica_ttl_s: float = 10.0,
        history_blocks: int = 16,
        max_entry_bytes: int = MAX_ENTRY_BYTES,
        max_state_bytes: int = MAX_STATE_BYTES,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", prefix):
            raise ValidationError("prefix", f"got {prefix!r}; expected 1-32 characters of [A-Za-z0-9_.-]")
        if history_blocks < 1:
            raise ValidationError("history_blocks", f"got {history_blocks}; expected >= 1")
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.replica_ttl_s = replica_ttl_s
        self.history_blocks = history_blocks
        self.max_entry_bytes = max_entry_bytes
        self.max_state_bytes = max_state_bytes
        self.redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            health_check_interval=30,
        )
        kwargs = self.redis.connection_pool.connection_kwargs
        # Where, for error messages: never the URL (it may hold a password).
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
        self._scripts = {name: self.redis.register_script(_LUA_HELPERS + src) for name, src in _SCRIPTS.items()}

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> SessionStore:
        kwargs: dict[str, Any] = {
            "url": settings.redis_url,
            "prefix": settings.redis_prefix,
            "timeout_s": settings.redis_timeout_s,
            "heartbeat_ttl_s": settings.heartbeat_ttl_s,
            "replica_ttl_s": settings.replica_ttl_s,
            "history_blocks": settings.history_blocks,
        }
        return cls(**(kwargs | overrides))

    async def aclose(self) -> None:
        await self.redis.aclose()

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- keys --------------------------------------------------------------------------------

    def session_key(self, session_id: str, part: str = "") -> str:
        return f"{self.prefix}:session:{session_id}" + (f":{part}" if part else "")

    def tenant_key(self, tenant_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}:sessions"

    def avatar_key(self, tenant_id: str, avatar_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}:avatar:{avatar_id}"

    def replica_key(self, replica_id: str, part: str) -> str:
        return f"{self.prefix}:replica:{replica_id}:{part}"

    @property
    def deadlines_key(self) -> str:
        return f"{self.prefix}:session-deadlines"

    @property
    def replicas_key(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def reaped_channel(self) -> str:
        return f"{self.prefix}:reaped"

    # -- plumbing ----------------------------------------------------------------------------

    async def _run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """One Redis operation, bounded by timeout_s; connection trouble -> StoreUnavailable."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await operation()
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"session store: {what}: Redis at {self.where} is unreachable or did not answer within "
                f"{self.timeout_s:g} s ({type(exc).__name__}); retry later"
            ) from exc

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        reply = await self._run(name, lambda: self._scripts[name](keys=keys, args=args))
        return [item.decode() if isinstance(item, bytes) else item for item in reply]

    @staticmethod
    def _raise_common(reply: list[Any], session_id: str, tenant_id: str) -> None:
        if reply[0] == "not_found":
            raise SessionNotFoundError(session_id)
        if reply[0] == "tenant_mismatch":
            raise TenantMismatchError("session_id", session_id, tenant_id)

    # -- sessions ----------------------------------------------------------------------------

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
        _check_ids(session_id, tenant_id)
        check_id("avatar_id", avatar_id)
        self._check_status(status)
        if not isinstance(room, str) or len(room) > MAX_ROOM_CHARS or not room.isprintable():
            raise ValidationError("room", f"expected at most {MAX_ROOM_CHARS} printable characters, got {room!r}")
        try:
            options_json = json.dumps(options or {}, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValidationError("options", f"not JSON-serialisable ({exc})") from exc
        if len(options_json) > MAX_OPTIONS_BYTES:
            raise ValidationError("options", f"{len(options_json)} bytes of JSON exceeds {MAX_OPTIONS_BYTES}")
        ttl = _ms(self.heartbeat_ttl_s)
        keys = [self.session_key(session_id), self.session_key(session_id, "heartbeat")]
        keys += [self.deadlines_key, self.tenant_key(tenant_id)]
        args = [session_id, tenant_id, avatar_id, room, status, options_json, ttl, max_tenant_sessions]
        reply = await self._script("create", keys, args)
        if reply[0] == "exists":
            raise FailedPreconditionError(f"session_id: a session {session_id!r} already exists")
        if reply[0] == "full":
            limit = max_tenant_sessions
            raise CapacityExceededError(f"tenant_id: tenant {tenant_id!r} has its limit of {limit} sessions")
        return await self.get(session_id, tenant_id)

    async def get(self, session_id: str, tenant_id: str) -> SessionRecord:
        _check_ids(session_id, tenant_id)
        data = await self._run("get", lambda: self.redis.hgetall(self.session_key(session_id)))
        if not data:
            raise SessionNotFoundError(session_id)
        record = SessionRecord.from_hash(data)
        if record.tenant_id != tenant_id:
            raise TenantMismatchError("session_id", session_id, tenant_id)
        return record

    async def list_sessions(self, tenant_id: str) -> list[SessionRecord]:
        """The tenant's sessions, by creation time."""
        check_id("tenant_id", tenant_id)
        ids = await self._run("list_sessions", lambda: self.redis.smembers(self.tenant_key(tenant_id)))
        if not ids:
            return []

        async def fetch() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.hgetall(self.session_key(sid.decode()))
                return await pipe.execute()

        records = [SessionRecord.from_hash(d) for d in await self._run("list_sessions", fetch) if d]
        return sorted((r for r in records if r.tenant_id == tenant_id), key=lambda r: (r.created_ms, r.session_id))

    async def heartbeat(self, session_id: str, tenant_id: str, status: str | None = None) -> None:
        """Keep the session alive for another heartbeat TTL (optionally setting its status)."""
        _check_ids(session_id, tenant_id)
        if status is not None:
            self._check_status(status)
        keys = [self.session_key(session_id), self.session_key(session_id, "heartbeat"), self.deadlines_key]
        reply = await self._script("heartbeat", keys, [session_id, tenant_id, _ms(self.heartbeat_ttl_s), status or ""])
        self._raise_common(reply, session_id, tenant_id)

    async def close(self, session_id: str, tenant_id: str) -> ReapedSession:
        """Delete the session now (every key), announcing it on the reaped channel."""
        _check_ids(session_id, tenant_id)
        reply = await self._script("close", [self.session_key(session_id)], [self.prefix, session_id, tenant_id])
        self._raise_common(reply, session_id, tenant_id)
        return ReapedSession.from_json(reply[1])

    async def missing(self, session_ids: Iterable[str]) -> set[str]:
        """Which of these sessions no longer exist (reaped or closed): their caches can go."""
        ids = list(session_ids)
        if not ids:
            return set()

        async def check() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.exists(self.session_key(sid))
                return await pipe.execute()

        return {sid for sid, present in zip(ids, await self._run("missing", check), strict=True) if not present}

    # -- ownership ---------------------------------------------------------------------------

    async def claim(
        self,
        session_id: str,
        tenant_id: str,
        replica_id: str,
        steal_from: str = "",
        max_sessions: int = 0,
    ) -> Claim:
        """Own the session if it is unowned, ours, its owner is dead, or its owner is `steal_from`.

        Raises OwnershipConflictError (another live replica owns it), CapacityExceededError (this replica
        owns max_sessions > 0 already), FailedPreconditionError (this replica is not registered alive).
        """
        _check_ids(session_id, tenant_id)
        check_id("replica_id", replica_id)
        if steal_from:
            check_id("steal_from", steal_from)
        args = [self.prefix, session_id, tenant_id, replica_id, steal_from, max_sessions]
        reply = await self._script("claim", [self.session_key(session_id)], args)
        self._raise_common(reply, session_id, tenant_id)
        status, epoch, owner = reply[0], int(reply[1]), reply[2]
        if status == "not_registered":
            raise FailedPreconditionError(
                f"replica_id: replica {replica_id!r} is not alive in the store; call replica_heartbeat first"
            )
        if status == "conflict":
            raise OwnershipConflictError(f"session_id: {session_id!r} is owned by live replica {owner!r}")
        if status == "full":
            raise CapacityExceededError(f"replica_id: replica {replica_id!r} already owns {max_sessions} sessions")
        return Claim(session_id, replica_id, epoch, owner, transferred=status == "claimed")

    async def release(self, session_id: str, tenant_id: str, replica_id: str, epoch: int) -> None:
        """Give up ownership (drain, close): the next claim by anyone succeeds at once."""
        _check_ids(session_id, tenant_id)
        args = [self.prefix, session_id, tenant_id, replica_id, epoch]
        reply = await self._script("release", [self.session_key(session_id)], args)
        self._raise_common(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(f"session_id: {session_id!r} is owned by {reply[1]!r} (epoch {reply[2]})")

    async def owned_sessions(self, replica_id: str) -> set[str]:
        check_id("replica_id", replica_id)
        members = await self._run(
            "owned_sessions", lambda: self.redis.smembers(self.replica_key(replica_id, "sessions"))
        )
        return {m.decode() for m in members}

    # -- avatars -----------------------------------------------------------------------------

    async def put_avatar(self, tenant_id: str, avatar_id: str, portrait: bytes) -> None:
        """Store (or replace) the portrait image bytes of the tenant's avatar."""
        check_id("tenant_id", tenant_id)
        check_id("avatar_id", avatar_id)
        data = _check_blob("portrait", portrait, MAX_PORTRAIT_BYTES)
        if not data:
            raise ValidationError("portrait", "empty; expected the JPEG or PNG bytes of the portrait")
        await self._run("put_avatar", lambda: self.redis.set(self.avatar_key(tenant_id, avatar_id), data))

    async def get_avatar(self, tenant_id: str, avatar_id: str) -> bytes:
        """The portrait bytes of the tenant's avatar; NotFoundError when the tenant has no such avatar."""
        check_id("tenant_id", tenant_id)
        check_id("avatar_id", avatar_id)
        data = await self._run("get_avatar", lambda: self.redis.get(self.avatar_key(tenant_id, avatar_id)))
        if data is None:
            raise NotFoundError(f"avatar_id: tenant {tenant_id!r} has no avatar {avatar_id!r}; upload its portrait")
        return bytes(data)

    # -- replicas ----------------------------------------------------------------------------

    async def replica_heartbeat(self, replica_id: str) -> None:
        """Mark the replica alive for another replica TTL (call every TTL/3 or so)."""
        check_id("replica_id", replica_id)

        async def beat() -> None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.set(self.replica_key(replica_id, "alive"), int(time.time() * 1000), px=_ms(self.replica_ttl_s))
                pipe.sadd(self.replicas_key, replica_id)
                await pipe.execute()

        await self._run("replica_heartbeat", beat)

    async def replica_alive(self, replica_id: str) -> bool:
        check_id("replica_id", replica_id)
        return bool(await self._run("replica_alive", lambda: self.redis.exists(self.replica_key(replica_id, "alive"))))

    async def deregister_replica(self, replica_id: str) -> None:
        """The replica is going away: its sessions become claimable now (not after the TTL)."""
        check_id("replica_id", replica_id)
        await self._run("deregister_replica", lambda: self.redis.delete(self.replica_key(replica_id, "alive")))

    # -- history and state -------------------------------------------------------------------

    async def append_block(
        self,
        session_id: str,
        tenant_id: str,
        claim: Claim,
        first_frame: int,
        num_frames: int,
        blob: bytes,
        latest_state: bytes | None = None,
    ) -> int:
        """Record a generated block (and optionally the latest state) and advance the frame cursor.

        Requires first_frame == the session's frame_cursor and the current owner and epoch.
        A retry of the block just recorded is a no-op. Returns the new frame cursor.
        Also refreshes the session heartbeat.
        """
        _check_ids(session_id, tenant_id)
        if not isinstance(first_frame, int) or first_frame < 0:
            raise ValidationError("first_frame", f"got {first_frame!r}; expected an integer >= 0")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValidationError("num_frames", f"got {num_frames!r}; expected an integer >= 1")
        entry = HistoryEntry(first_frame, num_frames, _check_blob("blob", blob, self.max_entry_bytes))
        state = b"" if latest_state is None else _check_blob("latest_state", latest_state, self.max_state_bytes)
        keys = [self.session_key(session_id, part) for part in ("", "history", "state", "heartbeat")]
        keys.append(self.deadlines_key)
        args = [session_id, tenant_id, claim.replica_id, claim.epoch, first_frame, num_frames, entry.to_bytes()]
        args += [self.history_blocks, "0" if latest_state is None else "1", state, _ms(self.heartbeat_ttl_s)]
        reply = await self._script("append", keys, args)
        self._raise_common(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(
                f"session_id: {session_id!r} is now owned by {reply[1]!r} (epoch {reply[2]}), "
                f"not {claim.replica_id!r} (epoch {claim.epoch}); drop its cache"
            )
        if reply[0] == "frame_conflict":
            cursor = int(reply[1])
            raise FrameConflictError(f"first_frame: got {first_frame}; expected the session's frame cursor {cursor}")
        return int(reply[1])

    async def put_state(self, session_id: str, tenant_id: str, claim: Claim, blob: bytes) -> int:
        """Overwrite the latest_state slot (owner only); returns the frame cursor it is tagged with."""
        _check_ids(session_id, tenant_id)
        blob = _check_blob("latest_state", blob, self.max_state_bytes)
        keys = [self.session_key(session_id), self.session_key(session_id, "state")]
        reply = await self._script("put_state", keys, [tenant_id, claim.replica_id, claim.epoch, blob])
        self._raise_common(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(f"session_id: {session_id!r} is now owned by {reply[1]!r} (epoch {reply[2]})")
        return int(reply[1])

    async def history(self, session_id: str, tenant_id: str) -> list[HistoryEntry]:
        return (await self.snapshot(session_id, tenant_id)).history

    async def snapshot(self, session_id: str, tenant_id: str) -> ResumeSnapshot:
        """Record, history (oldest first) and latest state, read in one transaction."""
        _check_ids(session_id, tenant_id)

        async def read() -> list[Any]:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.session_key(session_id))
                pipe.lrange(self.session_key(session_id, "history"), 0, -1)
                pipe.hgetall(self.session_key(session_id, "state"))
                return await pipe.execute()

        data, entries, state = await self._run("snapshot", read)
        if not data:
            raise SessionNotFoundError(session_id)
        record = SessionRecord.from_hash(data)
        if record.tenant_id != tenant_id:
            raise TenantMismatchError("session_id", session_id, tenant_id)
        snapshot_state = None
        if state:
            snapshot_state = StateSnapshot(int(state[b"frame_cursor"]), state[b"blob"], int(state[b"updated_ms"]))
        return ResumeSnapshot(record, [HistoryEntry.from_bytes(e) for e in entries], snapshot_state)

    # -- reaping -----------------------------------------------------------------------------

    async def reap(self, now: float | None = None, max_batches: int = 50) -> ReapResult:
        """Delete every session whose heartbeat expired (deadline <= now, heartbeat key gone).

        now: unix seconds bounding which deadlines are looked at; None: the Redis clock. A
        session whose heartbeat key still exists is never reaped, whatever `now` says.
        """
        now_arg = "" if now is None else str(int(now * 1000))
        sessions: list[ReapedSession] = []
        for _ in range(max_batches):
            reply = await self._script("reap", [self.deadlines_key], [self.prefix, now_arg, REAP_BATCH])
            sessions += [ReapedSession.from_json(info) for info in reply[1:]]
            if int(reply[0]) < REAP_BATCH:
                break
        dead = await self._script("reap_replicas", [self.replicas_key], [self.prefix])
        for session in sessions:
            log.info("reaped session %s of tenant %s (owner %r)", session.session_id, session.tenant_id, session.owner)
        return ReapResult(sessions, list(dead))

    async def reaped_events(self) -> AsyncIterator[ReapedSession]:
        """Reaped and closed sessions as they happen (pub/sub; delivery is best effort, so
        owners should also poll `missing()` for the sessions they cache)."""
        pubsub = self.redis.pubsub()
        try:
            await self._run("subscribe", lambda: pubsub.subscribe(self.reaped_channel))
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    yield ReapedSession.from_json(message["data"])
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"session store: reaped_events: Redis at {self.where} is unreachable") from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    # -- internals ---------------------------------------------------------------------------

    @staticmethod
    def _check_status(status: str) -> None:
        if status not in STATUSES:
            raise ValidationError("status", f"got {status!r}; expected one of {STATUSES}")


async def run_reaper(
    store: SessionStore,
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
