"""Client-side pacing: a sliding-window rate limiter, so that a client never exceeds the server's
MAX_CLIENT_MESSAGES_PER_SECOND (the server drops what comes faster)."""

from __future__ import annotations

import asyncio
import collections
import time

__all__ = ["RateLimiter"]


class RateLimiter:
    """At most `limit` acquisitions in any `period` seconds (a sliding window)."""

    def __init__(self, limit: int, period: float = 1.0) -> None:
        if limit < 1:
            raise ValueError(f"limit: got {limit}; expected >= 1")
        self.limit, self.period = limit, period
        self._times: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        """Wait until one more acquisition keeps within the limit, and take it."""
        async with self._lock:
            now = time.monotonic()
            while self._times and now - self._times[0] >= self.period:
                self._times.popleft()
            if len(self._times) >= self.limit:
                await asyncio.sleep(self._times[0] + self.period - now)
                self._times.popleft()
            self._times.append(time.monotonic())
