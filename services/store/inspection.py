"""Looking at (and clearing) a whole store namespace from outside the services: leak checks, teardown.

Synchronous on purpose: the benchmark and the tests call these between runs, outside any event loop.
They go through the key schema (services.store.keys), so nothing outside the store parses key names.
"""

from __future__ import annotations

import redis

from services.store.keys import KeyKind, KeySchema

# Report buckets, in report order, for the kinds that must be gone once every session has ended.
_LEAK_BUCKETS = {
    KeyKind.SESSION: "session",
    KeyKind.HISTORY: "history",
    KeyKind.STATE: "state",
    KeyKind.HEARTBEAT: "heartbeat",
    KeyKind.DEADLINES: "deadline index",
    KeyKind.TENANT_SESSIONS: "tenant index",
    KeyKind.REPLICA_SESSIONS: "replica sessions",
}
_SCAN_COUNT = 1000
_DELETE_CHUNK = 500  # keys per DEL: keeps each command (and Redis's pause for it) small


def _connect(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=5)


def leaked_session_keys(redis_url: str, prefix: str) -> dict[str, list[str]]:
    """Keys that must be gone once every session has ended, by kind (empty lists: nothing leaked).

    Keys are listed as they are; the index keys (deadline, tenant and replica session sets) are listed
    as "key -> member" per member. Kept on purpose, hence not listed: avatar portraits (durable) and
    replica liveness (`P:replica:{r}:alive`, `P:replicas`) while the replicas run. A key under a
    session's namespace that the store does not know counts as a leaked "session" key.
    """
    schema = KeySchema(prefix)
    found: dict[str, list[str]] = {bucket: [] for bucket in _LEAK_BUCKETS.values()}
    client = _connect(redis_url)
    try:
        for raw in client.scan_iter(match=schema.pattern, count=_SCAN_COUNT):
            key = raw.decode()
            parsed = schema.parse(key)
            if parsed is None:
                if key.startswith(schema.session_namespace):
                    found["session"].append(key)
                continue
            bucket = _LEAK_BUCKETS.get(parsed.kind)
            if bucket is None:
                continue
            if parsed.kind is KeyKind.DEADLINES:
                found[bucket] += [f"{key} -> {m.decode()}" for m in client.zrange(key, 0, -1)]
            elif parsed.kind in (KeyKind.TENANT_SESSIONS, KeyKind.REPLICA_SESSIONS):
                found[bucket] += [f"{key} -> {m.decode()}" for m in client.smembers(key)]
            else:
                found[bucket].append(key)
        return found
    finally:
        client.close()


def delete_namespace(redis_url: str, prefix: str) -> int:
    """Delete every key of this prefix (portraits and replicas included); returns how many."""
    schema = KeySchema(prefix)
    client = _connect(redis_url)
    try:
        keys = list(client.scan_iter(match=schema.pattern, count=_SCAN_COUNT))
        for start in range(0, len(keys), _DELETE_CHUNK):
            client.delete(*keys[start : start + _DELETE_CHUNK])
        return len(keys)
    finally:
        client.close()
