"""The Redis key schema of the session store: every key name is built here, from the prefix.

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
    P:tenants                   set     the ids of the tenants the gateway created
    P:tenant:{tid}              hash    the tenant record: tenant_id, name, created_ms, and the quotas
                                        (`services.store.quotas.TenantQuotas` fields); absent for a
                                        tenant known only from a token (default quotas apply)
    P:tenant:{tid}:keys         set     the tenant's API key ids
    P:tenant:{tid}:avatars      hash    avatar_id -> JSON metadata of the portrait (created_ms, bytes,
                                        format, width, height, sha256)
    P:tenant:{tid}:usage:{per}  hash    usage in one period (per = YYYYMM, UTC): session_seconds
    P:apikey:{kid}              hash    an API key: key_id, tenant_id, name, sha256 (of the secret;
                                        the secret itself is never stored), created_ms,
                                        last_used_ms, revoked_ms ("" while valid)
    P:rate:{kid}:{window}       string  requests of one key in one rate window (INCR + EXPIRE)
    P:avatar-invalidated        channel pub/sub: JSON {tenant_id, avatar_id} when an avatar is
                                        deleted or replaced; caches of its encoding drop it
    P:bridge:dispatch           stream  bridge dispatch: one entry per join/leave order for a LiveKit
                                        bridge (services.gateway.livekit; docs/gateway.md), read
                                        by bridge workers through the consumer group "bridges"
    P:bridge:owner:{sid}        string  the bridge worker (bridge id) holding the session's room, with a
                                        TTL its worker refreshes: where a leave order is forwarded
    P:bridge:inbox:{bid}        stream  orders forwarded to one bridge worker (a leave that another
                                        worker of the group read), read and deleted by that worker
    P:replica:{rid}:alive       string  TTL of the replica TTL: the replica is alive while it exists
    P:replica:{rid}:sessions    set     the session ids the replica owns
    P:replicas                  set     replica ids seen (dropped when dead and owning nothing)
    P:reaped                    channel pub/sub: JSON {session_id, tenant_id, owner, avatar_id,
                                        frame_cursor, reason} per reaped or closed session

The Lua scripts must name keys they only learn while running (a reaped session's tenant, a
claimed session's previous owner), so the same schema is also given to them as Lua functions
(`LUA_KEYS`); the two halves sit side by side so that they cannot drift apart.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from services.wire.errors import ValidationError

PREFIX_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,32}")
# The ids the store accepts (services.wire.ids.check_id); used here only to recognise keys.
_ID = r"[A-Za-z0-9_-]{1,64}"


class KeyKind(enum.StrEnum):
    """What a key of the namespace holds (one member per row of the table above)."""

    SESSION = "session"
    HEARTBEAT = "heartbeat"
    HISTORY = "history"
    STATE = "state"
    DEADLINES = "deadlines"
    TENANT_SESSIONS = "tenant sessions"
    AVATAR = "avatar"
    TENANTS = "tenants"
    TENANT = "tenant"
    TENANT_KEYS = "tenant keys"
    TENANT_AVATARS = "tenant avatars"
    USAGE = "usage"
    API_KEY = "api key"
    RATE = "rate"
    REPLICA_ALIVE = "replica alive"
    REPLICA_SESSIONS = "replica sessions"
    REPLICAS = "replicas"
    BRIDGE_DISPATCH = "bridge dispatch"
    BRIDGE_OWNER = "bridge owner"
    BRIDGE_INBOX = "bridge inbox"


@dataclass(frozen=True)
class ParsedKey:
    """A key of the namespace, taken apart: its kind and the ids it names ("" where none)."""

    kind: KeyKind
    session_id: str = ""
    tenant_id: str = ""
    avatar_id: str = ""
    replica_id: str = ""
    key_id: str = ""


# The parts of a session below its record key: P:session:{sid}:{part}.
_SESSION_PARTS = {"heartbeat": KeyKind.HEARTBEAT, "history": KeyKind.HISTORY, "state": KeyKind.STATE}


@dataclass(frozen=True)
class KeySchema:
    """The key names under one prefix. The prefix is checked once, here, for every user of it."""

    prefix: str

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not PREFIX_PATTERN.fullmatch(self.prefix):
            raise ValidationError("prefix", f"got {self.prefix!r}; expected 1-32 characters of [A-Za-z0-9_.-]")

    # -- sessions ----------------------------------------------------------------------------

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"

    def heartbeat(self, session_id: str) -> str:
        return f"{self.session(session_id)}:heartbeat"

    def history(self, session_id: str) -> str:
        return f"{self.session(session_id)}:history"

    def state(self, session_id: str) -> str:
        return f"{self.session(session_id)}:state"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:session-deadlines"

    # -- tenants -----------------------------------------------------------------------------

    @property
    def tenants(self) -> str:
        return f"{self.prefix}:tenants"

    def tenant(self, tenant_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}"

    def tenant_keys(self, tenant_id: str) -> str:
        return f"{self.tenant(tenant_id)}:keys"

    def tenant_avatars(self, tenant_id: str) -> str:
        return f"{self.tenant(tenant_id)}:avatars"

    def usage(self, tenant_id: str, period: str) -> str:
        return f"{self.tenant(tenant_id)}:usage:{period}"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}:apikey:{key_id}"

    def rate(self, key_id: str, window: int) -> str:
        return f"{self.prefix}:rate:{key_id}:{window}"

    @property
    def avatar_invalidated_channel(self) -> str:
        return f"{self.prefix}:avatar-invalidated"

    def tenant_sessions(self, tenant_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}:sessions"

    def avatar(self, tenant_id: str, avatar_id: str) -> str:
        return f"{self.prefix}:tenant:{tenant_id}:avatar:{avatar_id}"

    @property
    def bridge_dispatch(self) -> str:
        return f"{self.prefix}:bridge:dispatch"

    def bridge_owner(self, session_id: str) -> str:
        return f"{self.prefix}:bridge:owner:{session_id}"

    def bridge_inbox(self, bridge_id: str) -> str:
        return f"{self.prefix}:bridge:inbox:{bridge_id}"

    # -- replicas ----------------------------------------------------------------------------

    def replica_alive(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}:alive"

    def replica_sessions(self, replica_id: str) -> str:
        return f"{self.prefix}:replica:{replica_id}:sessions"

    @property
    def replicas(self) -> str:
        return f"{self.prefix}:replicas"

    @property
    def reaped_channel(self) -> str:
        return f"{self.prefix}:reaped"

    # -- the namespace as a whole -------------------------------------------------------------

    @property
    def pattern(self) -> str:
        """SCAN/KEYS pattern matching every key of this prefix (the prefix holds no glob characters)."""
        return f"{self.prefix}:*"

    @property
    def session_namespace(self) -> str:
        """The start of every key that belongs to one session."""
        return f"{self.prefix}:session:"

    def parse(self, key: str) -> ParsedKey | None:
        """The kind and ids of one of this schema's keys; None for anything the store does not write."""
        head = f"{self.prefix}:"
        if not key.startswith(head):
            return None
        rest = key[len(head) :]
        if rest == "session-deadlines":
            return ParsedKey(KeyKind.DEADLINES)
        if rest == "replicas":
            return ParsedKey(KeyKind.REPLICAS)
        if rest == "tenants":
            return ParsedKey(KeyKind.TENANTS)
        if rest == "bridge:dispatch":
            return ParsedKey(KeyKind.BRIDGE_DISPATCH)
        if match := re.fullmatch(rf"bridge:owner:({_ID})", rest):
            return ParsedKey(KeyKind.BRIDGE_OWNER, session_id=match[1])
        if rest.startswith("bridge:inbox:"):
            return ParsedKey(KeyKind.BRIDGE_INBOX)
        if match := re.fullmatch(rf"session:({_ID})(?::([^:]+))?", rest):
            sid, part = match.groups()
            if part is None:
                return ParsedKey(KeyKind.SESSION, session_id=sid)
            kind = _SESSION_PARTS.get(part)
            return None if kind is None else ParsedKey(kind, session_id=sid)
        if match := re.fullmatch(rf"tenant:({_ID})", rest):
            return ParsedKey(KeyKind.TENANT, tenant_id=match[1])
        if match := re.fullmatch(rf"tenant:({_ID}):(sessions|keys|avatars)", rest):
            kind = {"sessions": KeyKind.TENANT_SESSIONS, "keys": KeyKind.TENANT_KEYS, "avatars": KeyKind.TENANT_AVATARS}
            return ParsedKey(kind[match[2]], tenant_id=match[1])
        if match := re.fullmatch(rf"tenant:({_ID}):usage:(\d{{6}})", rest):
            return ParsedKey(KeyKind.USAGE, tenant_id=match[1])
        if match := re.fullmatch(rf"apikey:({_ID})", rest):
            return ParsedKey(KeyKind.API_KEY, key_id=match[1])
        if match := re.fullmatch(rf"rate:({_ID}):(\d+)", rest):
            return ParsedKey(KeyKind.RATE, key_id=match[1])
        if match := re.fullmatch(rf"tenant:({_ID}):avatar:({_ID})", rest):
            return ParsedKey(KeyKind.AVATAR, tenant_id=match[1], avatar_id=match[2])
        if match := re.fullmatch(rf"replica:({_ID}):(alive|sessions)", rest):
            kind = KeyKind.REPLICA_ALIVE if match[2] == "alive" else KeyKind.REPLICA_SESSIONS
            return ParsedKey(kind, replica_id=match[1])
        return None


# The same schema for the Lua scripts (P is the prefix, passed in ARGV). Keep in step with KeySchema.
LUA_KEYS = """
local function session_key(P, sid) return P .. ':session:' .. sid end
local function heartbeat_key(P, sid) return session_key(P, sid) .. ':heartbeat' end
local function history_key(P, sid) return session_key(P, sid) .. ':history' end
local function state_key(P, sid) return session_key(P, sid) .. ':state' end
local function deadlines_key(P) return P .. ':session-deadlines' end
local function tenant_sessions_key(P, tid) return P .. ':tenant:' .. tid .. ':sessions' end
local function replica_alive_key(P, rid) return P .. ':replica:' .. rid .. ':alive' end
local function replica_sessions_key(P, rid) return P .. ':replica:' .. rid .. ':sessions' end
local function replicas_key(P) return P .. ':replicas' end
local function reaped_channel(P) return P .. ':reaped' end
"""
