"""Redis session state: the only code that reads or writes Redis keys.

Modules (the public names are re-exported here; import them from `services.store`):

    keys        the key schema (the key table), for Python and for the Lua scripts
    records     SessionRecord, HistoryEntry (and its byte codec), snapshots, Claim, reap results
    validation  limits and argument checks
    scripts     the Lua scripts (the atomic operations) and their shared replies
    client      the Redis connection: timeouts, StoreUnavailable, running a script
    sessions    session records and session liveness
    ownership   claim / release: which replica owns a session
    history     the history ring, latest_state, the resume snapshot
    avatars     avatar portraits
    replicas    replica liveness
    tenants     tenants and their API keys (hashed secrets, revocation, last use)
    ratelimit   request rate per API key (a fixed window on the Redis clock)
    dispatch    the bridge dispatch stream (LiveKit join/leave orders)
    reaper      reaping expired sessions and dead replicas; run_reaper
    store       SessionStore, composed of the operation groups above
    inspection  leak checks and namespace teardown for the benchmark and tests (synchronous)
"""

from services.store.reaper import REAP_BATCH, run_reaper
from services.store.records import (
    Claim,
    HistoryEntry,
    ReapedSession,
    ReapResult,
    ResumeSnapshot,
    SessionRecord,
    StateSnapshot,
)
from services.store.store import SessionStore
from services.store.validation import (
    MAX_ENTRY_BYTES,
    MAX_OPTIONS_BYTES,
    MAX_PORTRAIT_BYTES,
    MAX_ROOM_CHARS,
    MAX_STATE_BYTES,
    STATUSES,
)
from services.wire.errors import StoreUnavailable

__all__ = [
    "MAX_ENTRY_BYTES",
    "MAX_OPTIONS_BYTES",
    "MAX_PORTRAIT_BYTES",
    "MAX_ROOM_CHARS",
    "MAX_STATE_BYTES",
    "REAP_BATCH",
    "STATUSES",
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
