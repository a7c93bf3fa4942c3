"""Tenant quotas and usage: what a tenant may use, and what it used in the current period.

The quotas live in the tenant record (P:tenant:{tid}, one hash field per `TenantQuotas` field),
written by the gateway's admin API; a tenant known only from a token (minted on the command line)
has no record and gets `DEFAULT_QUOTAS`. Usage is counted per calendar month (UTC) in
P:tenant:{tid}:usage:{YYYYMM}. Both the gateway (at session create) and the serving stack (at
Stream start and while a session runs) enforce them, so a limit holds whichever door is used.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.validation import MAX_PORTRAIT_BYTES
from services.wire.errors import ValidationError
from services.wire.ids import check_id

USAGE_TTL_S = 400 * 24 * 3600  # a period's usage outlives its month (reports), then expires


@dataclass(frozen=True)
class TenantQuotas:
    max_concurrent_sessions: int = 4  # sessions open at once (record exists, not closed or reaped)
    max_session_minutes: float = 600.0  # generated session time per calendar month (UTC)
    max_portrait_bytes: int = MAX_PORTRAIT_BYTES  # one uploaded portrait
    requests_per_minute: int = 120  # gateway requests per API key

    def __post_init__(self) -> None:
        for name, low in (("max_concurrent_sessions", 0), ("requests_per_minute", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValidationError(f"quotas.{name}", f"got {value!r}; expected an integer >= {low}")
        minutes = self.max_session_minutes
        if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not 0 <= minutes < 1e9:
            raise ValidationError("quotas.max_session_minutes", f"got {minutes!r}; expected minutes in [0, 1e9)")
        size = self.max_portrait_bytes
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PORTRAIT_BYTES:
            raise ValidationError(
                "quotas.max_portrait_bytes", f"got {size!r}; expected an integer in [1, {MAX_PORTRAIT_BYTES}]"
            )

    def to_fields(self) -> dict[str, str]:
        """The hash fields of the tenant record that hold these quotas."""
        return {name: str(value) for name, value in asdict(self).items()}

    @classmethod
    def from_fields(cls, data: dict[bytes, bytes] | dict[str, str]) -> TenantQuotas:
        """Quotas from a tenant record's hash fields; a missing field takes its default."""
        text = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                for k, v in data.items()}  # fmt: skip
        values: dict[str, int | float] = {}
        for field in fields(cls):
            if field.name in text:
                values[field.name] = float(text[field.name]) if field.type == "float" else int(text[field.name])
        return cls(**values)


DEFAULT_QUOTAS = TenantQuotas()


def usage_period(now: float | None = None) -> str:
    """The usage period (YYYYMM, UTC) that contains `now`."""
    return time.strftime("%Y%m", time.gmtime(time.time() if now is None else now))


@dataclass(frozen=True)
class TenantUsage:
    period: str  # YYYYMM
    session_seconds: float  # generated session time in the period
    active_sessions: int  # sessions open now


class QuotaOps:
    """The quota and usage operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def tenant_quotas(self, tenant_id: str) -> TenantQuotas:
        """The tenant's quotas: its record's, or DEFAULT_QUOTAS for a tenant without a record."""
        check_id("tenant_id", tenant_id)
        key = self.keys.tenant(tenant_id)
        data = await self.client.run("tenant_quotas", lambda: self.client.redis.hgetall(key))
        return TenantQuotas.from_fields(data) if data else DEFAULT_QUOTAS

    async def add_session_seconds(self, tenant_id: str, seconds: float, now: float | None = None) -> float:
        """Count `seconds` of generated session time; returns the period's total."""
        check_id("tenant_id", tenant_id)
        if not 0 <= seconds < 1e7:
            raise ValidationError("seconds", f"got {seconds!r}; expected seconds in [0, 1e7)")
        key = self.keys.usage(tenant_id, usage_period(now))

        async def add() -> float:
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hincrbyfloat(key, "session_seconds", float(seconds))
                pipe.expire(key, USAGE_TTL_S)
                total, _ = await pipe.execute()
            return float(total)

        return await self.client.run("add_session_seconds", add)

    async def tenant_usage(self, tenant_id: str, now: float | None = None) -> TenantUsage:
        """The tenant's usage in the current period and its open sessions."""
        check_id("tenant_id", tenant_id)
        period = usage_period(now)
        usage_key, sessions_key = self.keys.usage(tenant_id, period), self.keys.tenant_sessions(tenant_id)

        async def read() -> tuple[bytes | None, int]:
            async with self.client.redis.pipeline(transaction=False) as pipe:
                pipe.hget(usage_key, "session_seconds")
                pipe.scard(sessions_key)
                seconds, active = await pipe.execute()
            return seconds, int(active)

        seconds, active = await self.client.run("tenant_usage", read)
        return TenantUsage(period, float(seconds or 0.0), active)
