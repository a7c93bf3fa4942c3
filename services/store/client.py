"""The store's connection to Redis: timeouts, retries, and what an outage looks like to callers.

Every operation is bounded by `timeout_s`; an unreachable or silent Redis (or one that became a
read-only replica in a failover) raises StoreUnavailable, never a redis-py exception, so the
services can answer UNAVAILABLE and the caller retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from services.store.scripts import register_scripts
from services.wire.errors import StoreUnavailable

T = TypeVar("T")

# The exceptions that mean "Redis is not answering" rather than "the request was wrong".
UNAVAILABLE = (
    redis_errors.ConnectionError,  # includes BusyLoadingError
    redis_errors.TimeoutError,
    redis_errors.ReadOnlyError,  # talking to a replica during failover
    TimeoutError,
    OSError,
)


class StoreClient:
    """One async Redis client with the store's scripts registered on it."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.redis = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=timeout_s,
            # A few quick retries ride over a dropped connection; longer outages surface as StoreUnavailable.
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), retries=2),
            health_check_interval=30,
        )
        kwargs = self.redis.connection_pool.connection_kwargs
        # Where, for error messages: never the URL (it may hold a password).
        self.where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}/{kwargs.get('db', 0)}"
        self._scripts = register_scripts(self.redis)

    async def run(self, what: str, operation: Callable[[], Awaitable[T]]) -> T:
        """One Redis operation, bounded by timeout_s; connection trouble -> StoreUnavailable."""
        try:
            async with asyncio.timeout(self.timeout_s):
                return await operation()
        except UNAVAILABLE as exc:
            raise StoreUnavailable(
                f"session store: {what}: Redis at {self.where} is unreachable or did not answer within "
                f"{self.timeout_s:g} s ({type(exc).__name__}); retry later"
            ) from exc

    async def script(self, name: str, keys: list[str], args: list[Any]) -> list[Any]:
        """Run one of the store's scripts (services.store.scripts); its reply with bytes decoded to str."""
        reply = await self.run(name, lambda: self._scripts[name](keys=keys, args=args))
        return [item.decode() if isinstance(item, bytes) else item for item in reply]

    def unavailable(self, what: str) -> StoreUnavailable:
        """The error for an operation that lost Redis without a per-call timeout (a subscription)."""
        return StoreUnavailable(f"session store: {what}: Redis at {self.where} is unreachable")

    async def aclose(self) -> None:
        await self.redis.aclose()
