"""Request rate per API key: a fixed window counted in Redis (P:rate:{kid}:{window}).

    await store.check_rate("k0123...", limit=120)   # RateDecision, or QuotaExceededError("requests_per_minute")

One Lua script per request: it reads the Redis server clock (TIME), so that every gateway replica
agrees on the window whatever its own clock says, increments the window's counter (INCR) and sets
its expiry on the first hit, all atomically. With `limit` L, the first L requests of a window pass
and the next one fails, however many replicas share the key; `retry_after_s` is the time left in
the window. Windows are aligned to the server clock (a minute starts at hh:mm:00.000), so a client
can make up to 2L requests across one window boundary: the price of one counter per request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.wire.errors import QuotaExceededError, ValidationError
from services.wire.ids import check_id

RATE_WINDOW_S = 60

# ARGV: the key's rate-key stem (P:rate:{kid}), window (ms). Reply: {count, ms left in the window}.
# The window key is P:rate:{kid}:{window index}, built here from the server clock (hence a single primary).
_HIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local size = tonumber(ARGV[2])
local window = math.floor(now / size)
local key = ARGV[1] .. ':' .. string.format('%d', window)
local count = redis.call('INCR', key)
if count == 1 then redis.call('PEXPIRE', key, size * 2) end
return {count, (window + 1) * size - now}
"""


@dataclass(frozen=True)
class RateDecision:
    count: int  # requests in the current window, this one included
    limit: int
    reset_s: float  # seconds until the window ends

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)


class RateLimitOps:
    """The rate-limit operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def check_rate(self, key_id: str, limit: int, window_s: int = RATE_WINDOW_S) -> RateDecision:
        """Count one request of the key; QuotaExceededError("requests_per_minute") past `limit` per window."""
        check_id("key_id", key_id)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValidationError("limit", f"got {limit!r}; expected an integer >= 1")
        stem = self.keys.rate(key_id, 0).rsplit(":", 1)[0]
        if self.__dict__.get("_rate_hit") is None:
            self.__dict__["_rate_hit"] = self.client.redis.register_script(_HIT)
        script = self.__dict__["_rate_hit"]
        count, left_ms = await self.client.run("check_rate", lambda: script(keys=[], args=[stem, int(window_s * 1000)]))
        decision = RateDecision(int(count), limit, int(left_ms) / 1000)
        if decision.count > limit:
            raise QuotaExceededError(
                "requests_per_minute",
                f"API key {key_id!r} made {limit} requests in this {window_s} s window (its limit); "
                f"retry in {math.ceil(decision.reset_s)} s",
                retry_after_s=decision.reset_s,
            )
        return decision
