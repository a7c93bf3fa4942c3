"""`SessionStore`: the configured whole, one object composed of the store's operation groups.

The operations live with the concept they serve (sessions, ownership, history, avatars, replicas,
reaping); this module owns the configuration they share and the client's lifetime.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from services.common.config import Settings
from services.store.avatars import AvatarOps
from services.store.client import StoreClient
from services.store.dispatch import DispatchOps
from services.store.history import HistoryOps
from services.store.keys import KeySchema
from services.store.ownership import OwnershipOps
from services.store.quotas import QuotaOps
from services.store.ratelimit import RateLimitOps
from services.store.reaper import ReaperOps
from services.store.replicas import ReplicaOps
from services.store.sessions import SessionOps
from services.store.tenants import TenantOps
from services.store.validation import MAX_ENTRY_BYTES, MAX_STATE_BYTES
from services.wire.errors import ValidationError


class SessionStore(
    SessionOps,
    OwnershipOps,
    HistoryOps,
    AvatarOps,
    QuotaOps,
    ReplicaOps,
    ReaperOps,
    TenantOps,
    RateLimitOps,
    DispatchOps,
):
    """Async access to the session state in Redis (schema: services.store.keys)."""

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
        self.keys = KeySchema(prefix)  # validates the prefix
        if history_blocks < 1:
            raise ValidationError("history_blocks", f"got {history_blocks}; expected >= 1")
        self.prefix = prefix
        self.timeout_s = timeout_s
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.replica_ttl_s = replica_ttl_s
        self.history_blocks = history_blocks
        self.max_entry_bytes = max_entry_bytes
        self.max_state_bytes = max_state_bytes
        self.client = StoreClient(url, timeout_s)

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

    @property
    def redis(self) -> aioredis.Redis:
        """The underlying client (tests inspect the documented keys through it)."""
        return self.client.redis

    @property
    def where(self) -> str:
        """host:port/db (or socket path) of the Redis server, for messages: never the URL."""
        return self.client.where

    async def aclose(self) -> None:
        await self.client.aclose()

    async def __aenter__(self) -> SessionStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
