"""The store's Lua scripts: every read-check-write that must be atomic runs as one of them.

Each script is registered with the key schema's Lua half (`keys.LUA_KEYS`) and the helpers below
in front of it. Times come from the Redis server clock (TIME), so replicas with skewed clocks
agree on deadlines. A script addresses keys it builds from the prefix in ARGV (not only those in
KEYS), which is why the store needs a single Redis primary, not Redis Cluster.

Replies are arrays whose first element is a status word; 'not_found' and 'tenant_mismatch' mean
the same to every session script (`raise_for_session`), and both reach the caller as the same
NOT_FOUND: another tenant's session is indistinguishable from an unknown one.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

from services.store.keys import LUA_KEYS
from services.wire.errors import SessionNotFoundError

# purge: delete every key of one session and announce it on the reaped channel; shared by close and reap.
_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format('%d', x) end
local function purge(P, sid, reason)
  local record = session_key(P, sid)
  local rec = redis.call('HMGET', record, 'tenant_id', 'owner', 'avatar_id', 'frame_cursor')
  redis.call('DEL', record, heartbeat_key(P, sid), history_key(P, sid), state_key(P, sid))
  redis.call('ZREM', deadlines_key(P), sid)
  if rec[1] then redis.call('SREM', tenant_sessions_key(P, rec[1]), sid) end
  if rec[2] and rec[2] ~= '' then redis.call('SREM', replica_sessions_key(P, rec[2]), sid) end
  local info = cjson.encode({session_id = sid, tenant_id = rec[1] or '', owner = rec[2] or '',
    avatar_id = rec[3] or '', frame_cursor = tonumber(rec[4] or '0'), reason = reason})
  redis.call('PUBLISH', reaped_channel(P), info)
  return info
end
"""

# KEYS: record, heartbeat, deadlines, tenant set, tenant record
# ARGV: sid, tenant, avatar, room, status, options, ttl_ms, limit, default_limit, prefix
# limit >= 0: that many sessions at most (0: no limit); limit < 0: the tenant's quota,
# max_concurrent_sessions of its record (default_limit without one). The sessions counted are the
# tenant's live ones (heartbeat key present): one the reaper has not reached yet does not count.
# So the check and the insert are one step: N concurrent creates never exceed the limit.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
local limit = tonumber(ARGV[8])
local enforce = limit > 0
if limit < 0 then
  limit = tonumber(redis.call('HGET', KEYS[5], 'max_concurrent_sessions') or ARGV[9])
  enforce = true
end
if enforce then
  local open = 0
  for _, sid in ipairs(redis.call('SMEMBERS', KEYS[4])) do
    if redis.call('EXISTS', heartbeat_key(ARGV[10], sid)) == 1 then open = open + 1 end
  end
  if open >= limit then return {'full', int(open), int(limit)} end
end
local now = now_ms()
redis.call('HSET', KEYS[1], 'session_id', ARGV[1], 'tenant_id', ARGV[2], 'avatar_id', ARGV[3],
  'room', ARGV[4], 'status', ARGV[5], 'options', ARGV[6], 'created_ms', int(now), 'updated_ms', int(now),
  'frame_cursor', '0', 'owner', '', 'owner_epoch', '0', 'last_block_frame', '-1')
redis.call('SET', KEYS[2], '1', 'PX', ARGV[7])
redis.call('ZADD', KEYS[3], int(now + tonumber(ARGV[7])), ARGV[1])
redis.call('SADD', KEYS[4], ARGV[1])
return {'ok'}
"""

# KEYS: record     ARGV: tenant
# pending/active -> stopping (the stream ends after its current block); stopping stays stopping.
_REQUEST_STOP = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'status')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[1] then return {'tenant_mismatch'} end
if rec[2] ~= 'stopping' then
  redis.call('HSET', KEYS[1], 'status', 'stopping', 'updated_ms', int(now_ms()))
end
return {'ok', rec[2] or ''}
"""

# KEYS: record     ARGV: tenant, figures (JSON)
_SET_FIGURES = """
local tenant = redis.call('HGET', KEYS[1], 'tenant_id')
if not tenant then return {'not_found'} end
if tenant ~= ARGV[1] then return {'tenant_mismatch'} end
redis.call('HSET', KEYS[1], 'figures', ARGV[2])
return {'ok'}
"""

# KEYS: portrait, tenant avatars hash, invalidated channel
# ARGV: avatar_id, portrait bytes, sha256, metadata JSON without created_ms, event JSON
# The same bytes again change nothing (no event: caches stay valid). Other bytes replace the
# portrait and its metadata in one step and announce the avatar on the invalidated channel.
_PUT_AVATAR = """
local existed = redis.call('EXISTS', KEYS[1]) == 1
if existed then
  local old = redis.call('HGET', KEYS[2], ARGV[1])
  if old and cjson.decode(old)['sha256'] == ARGV[3] then return {'unchanged'} end
end
local meta = cjson.decode(ARGV[4])
meta['created_ms'] = tonumber(int(now_ms()))
redis.call('SET', KEYS[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], cjson.encode(meta))
if existed then
  redis.call('PUBLISH', KEYS[3], ARGV[5])
  return {'replaced'}
end
return {'created'}
"""

# KEYS: portrait, tenant avatars hash, invalidated channel     ARGV: avatar_id, event JSON
_DELETE_AVATAR = """
local existed = redis.call('DEL', KEYS[1])
local had_meta = redis.call('HDEL', KEYS[2], ARGV[1])
if existed == 0 and had_meta == 0 then return {'not_found'} end
redis.call('PUBLISH', KEYS[3], ARGV[2])
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
-- a requested stop is never undone by a heartbeat (the stream that sees it ends the session)
if ARGV[4] ~= '' and redis.call('HGET', KEYS[1], 'status') ~= 'stopping' then
  redis.call('HSET', KEYS[1], 'status', ARGV[4])
end
return {'ok'}
"""

# KEYS: record     ARGV: prefix, sid, tenant, replica, steal_from, max_sessions
# The ownership compare-and-set (see services.store.ownership).
_CLAIM = """
local rec = redis.call('HMGET', KEYS[1], 'tenant_id', 'owner', 'owner_epoch')
if not rec[1] then return {'not_found'} end
if rec[1] ~= ARGV[3] then return {'tenant_mismatch'} end
local P, sid, replica = ARGV[1], ARGV[2], ARGV[4]
local owner, epoch = rec[2] or '', tonumber(rec[3] or '0')
if redis.call('EXISTS', replica_alive_key(P, replica)) == 0 then
  return {'not_registered', int(epoch), owner}
end
if owner == replica then return {'owned', int(epoch), owner} end
if owner ~= '' and owner ~= ARGV[5] and redis.call('EXISTS', replica_alive_key(P, owner)) == 1 then
  return {'conflict', int(epoch), owner}
end
local mine = replica_sessions_key(P, replica)
local limit = tonumber(ARGV[6])
if limit > 0 and redis.call('SCARD', mine) >= limit then return {'full', int(epoch), owner} end
if owner ~= '' then redis.call('SREM', replica_sessions_key(P, owner), sid) end
redis.call('SADD', mine, sid)
redis.call('SADD', replicas_key(P), replica)
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
redis.call('SREM', replica_sessions_key(ARGV[1], ARGV[4]), ARGV[2])
redis.call('HSET', KEYS[1], 'owner', '', 'updated_ms', int(now_ms()))
return {'ok'}
"""

# KEYS: record, history, state, heartbeat, deadlines
# ARGV: sid, tenant, replica, epoch, first_frame, num_frames, entry, history_len, has_state, state, ttl_ms
# Fenced by owner and epoch; first_frame must equal the cursor, or be a retry of the last block.
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
  local ttl = redis.call('PTTL', heartbeat_key(P, sid))
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
# A replica is forgotten only once it is dead and owns nothing (its sessions were claimed or reaped).
_REAP_REPLICAS = """
local dead = {}
for _, rid in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', replica_alive_key(ARGV[1], rid)) == 0
      and redis.call('SCARD', replica_sessions_key(ARGV[1], rid)) == 0 then
    redis.call('SREM', KEYS[1], rid)
    table.insert(dead, rid)
  end
end
return dead
"""

SOURCES = {
    "create": _CREATE,
    "heartbeat": _HEARTBEAT,
    "claim": _CLAIM,
    "release": _RELEASE,
    "append": _APPEND,
    "put_state": _PUT_STATE,
    "close": _CLOSE,
    "request_stop": _REQUEST_STOP,
    "set_figures": _SET_FIGURES,
    "put_avatar": _PUT_AVATAR,
    "delete_avatar": _DELETE_AVATAR,
    "reap": _REAP,
    "reap_replicas": _REAP_REPLICAS,
}


def register_scripts(redis: aioredis.Redis) -> dict[str, AsyncScript]:
    """Every script, ready to run on this client (EVALSHA, loading it on first use)."""
    return {name: redis.register_script(LUA_KEYS + _HELPERS + source) for name, source in SOURCES.items()}


def raise_for_session(reply: list[Any], session_id: str, tenant_id: str) -> None:
    """The replies every session script shares: no such session, or another tenant's.

    Both raise the same SessionNotFoundError (NOT_FOUND, the same message): a tenant cannot tell
    another tenant's session from one that does not exist.
    """
    if reply[0] in ("not_found", "tenant_mismatch"):
        raise SessionNotFoundError(session_id)
