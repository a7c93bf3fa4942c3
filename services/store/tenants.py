"""Tenants and their API keys (P:tenants, P:tenant:{tid}, P:tenant:{tid}:keys, P:apikey:{kid}).

    record = await store.create_tenant("acme", "Acme Inc.", TenantQuotas(max_concurrent_sessions=8))
    key, secret = await store.create_api_key("acme", "ci")     # `secret` is shown once, never stored
    key = await store.authenticate_api_key(secret)             # ApiKeyRecord, or UnauthenticatedError
    await store.revoke_api_key("acme", key.key_id)             # the next authenticate fails

An API key as a client holds it: `afk_{key_id}.{secret}`. The key id is public (it names the key in
listings, logs and P:apikey:{kid}); the secret is 256 random bits, and only its SHA-256 is stored.
Checking a key reads its record and compares the digests in constant time (`hmac.compare_digest`);
an unknown key id, a wrong secret and a revoked key fail alike, with the same message. Every
successful check writes `last_used_ms`. Nothing is cached: a revoked key fails on its very next use,
at every gateway replica.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, replace
from typing import Any

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.quotas import DEFAULT_QUOTAS, TenantQuotas
from services.wire.errors import ConflictError, NotFoundError, UnauthenticatedError, ValidationError
from services.wire.ids import check_id

API_KEY_PREFIX = "afk_"
_API_KEY_RE = re.compile(r"^afk_(k[0-9a-f]{16})\.([A-Za-z0-9_-]{43})$")
MAX_NAME_CHARS = 128
_BAD_KEY = "invalid API key (unknown, revoked, or not the key's secret)"
_DUMMY_DIGEST = hashlib.sha256(b"no such key").hexdigest()
# KEYS: the key record; ARGV: now (ms). 1: last use recorded; 0: the key is gone or revoked.
_TOUCH = """
if redis.call('HEXISTS', KEYS[1], 'key_id') == 0 then return 0 end
local revoked = redis.call('HGET', KEYS[1], 'revoked_ms')
if revoked and revoked ~= '' then return 0 end
redis.call('HSET', KEYS[1], 'last_used_ms', ARGV[1])
return 1
"""


def _now_ms() -> int:
    return int(time.time() * 1000)


def _text(data: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in data.items()
    }


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise ValidationError("name", f"got {name!r}; expected at most {MAX_NAME_CHARS} printable characters")
    return name


@dataclass(frozen=True)
class TenantRecord:
    tenant_id: str
    name: str
    created_ms: int
    quotas: TenantQuotas

    @classmethod
    def from_hash(cls, data: dict[Any, Any]) -> TenantRecord:
        text = _text(data)
        return cls(text["tenant_id"], text.get("name", ""), int(text["created_ms"]), TenantQuotas.from_fields(text))


@dataclass(frozen=True)
class ApiKeyRecord:
    key_id: str
    tenant_id: str
    name: str
    created_ms: int
    last_used_ms: int | None  # None: never used
    revoked_ms: int | None  # None: valid

    @property
    def revoked(self) -> bool:
        return self.revoked_ms is not None

    @classmethod
    def from_hash(cls, data: dict[Any, Any]) -> ApiKeyRecord:
        text = _text(data)
        return cls(
            key_id=text["key_id"],
            tenant_id=text["tenant_id"],
            name=text.get("name", ""),
            created_ms=int(text["created_ms"]),
            last_used_ms=int(text["last_used_ms"]) if text.get("last_used_ms") else None,
            revoked_ms=int(text["revoked_ms"]) if text.get("revoked_ms") else None,
        )


class TenantOps:
    """The tenant and API-key operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    # -- tenants -----------------------------------------------------------------------------

    async def create_tenant(
        self, tenant_id: str, name: str = "", quotas: TenantQuotas = DEFAULT_QUOTAS
    ) -> TenantRecord:
        """A new tenant record; ConflictError when the tenant exists."""
        check_id("tenant_id", tenant_id)
        check_name(name)
        record = TenantRecord(tenant_id, name, _now_ms(), quotas)
        fields = {"tenant_id": tenant_id, "name": name, "created_ms": str(record.created_ms)} | quotas.to_fields()
        key, index = self.keys.tenant(tenant_id), self.keys.tenants

        async def create() -> bool:
            # HSETNX on tenant_id claims the id; the rest of the record follows in one transaction.
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hsetnx(key, "tenant_id", tenant_id)
                (claimed,) = await pipe.execute()
            if not claimed:
                return False
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hset(key, mapping=fields)
                pipe.sadd(index, tenant_id)
                await pipe.execute()
            return True

        if not await self.client.run("create_tenant", create):
            raise ConflictError(f"tenant_id: a tenant {tenant_id!r} already exists")
        return record

    async def get_tenant(self, tenant_id: str) -> TenantRecord:
        check_id("tenant_id", tenant_id)
        data = await self.client.run("get_tenant", lambda: self.client.redis.hgetall(self.keys.tenant(tenant_id)))
        if not data or b"created_ms" not in data:
            raise NotFoundError(f"tenant_id: no tenant {tenant_id!r}")
        return TenantRecord.from_hash(data)

    async def list_tenants(self) -> list[TenantRecord]:
        redis = self.client.redis
        ids = await self.client.run("list_tenants", lambda: redis.smembers(self.keys.tenants))

        async def fetch() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for tid in sorted(ids):
                    pipe.hgetall(self.keys.tenant(tid.decode()))
                return await pipe.execute()

        rows = await self.client.run("list_tenants", fetch) if ids else []
        return sorted((TenantRecord.from_hash(d) for d in rows if d and b"created_ms" in d), key=lambda t: t.tenant_id)

    async def update_tenant(
        self, tenant_id: str, *, name: str | None = None, quotas: dict[str, Any] | None = None
    ) -> TenantRecord:
        """Change the name and/or some quota fields (the others keep their values)."""
        current = await self.get_tenant(tenant_id)
        merged = current.quotas
        if quotas:
            unknown = sorted(set(quotas) - set(TenantQuotas.__dataclass_fields__))
            if unknown:
                raise ValidationError(f"quotas.{unknown[0]}", "unknown quota")
            merged = replace(current.quotas, **quotas)  # validated by TenantQuotas
        updated = replace(current, name=check_name(name) if name is not None else current.name, quotas=merged)
        fields = {"name": updated.name} | merged.to_fields()
        key = self.keys.tenant(tenant_id)

        async def write() -> bool:
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.exists(key)
                pipe.hset(key, mapping=fields)
                exists, _ = await pipe.execute()
            if not exists:  # deleted between the read and the write: undo the stray fields
                await self.client.redis.delete(key)
            return bool(exists)

        if not await self.client.run("update_tenant", write):
            raise NotFoundError(f"tenant_id: no tenant {tenant_id!r}")
        return updated

    async def delete_tenant_record(self, tenant_id: str) -> None:
        """Delete the tenant record, its keys (records and rate windows) and its usage counters.
        Sessions and avatars are the caller's to end first (the gateway does, through their ops)."""
        await self.get_tenant(tenant_id)
        redis = self.client.redis
        keys_key = self.keys.tenant_keys(tenant_id)

        async def delete() -> None:
            key_ids = [k.decode() for k in await redis.smembers(keys_key)]
            doomed = [self.keys.tenant(tenant_id), keys_key] + [self.keys.api_key(k) for k in key_ids]
            for pattern in [self.keys.usage(tenant_id, "*")] + [self.keys.rate(k, "*") for k in key_ids]:  # type: ignore[arg-type]
                doomed += [key async for key in redis.scan_iter(match=pattern, count=500)]
            async with redis.pipeline(transaction=True) as pipe:
                pipe.delete(*doomed)
                pipe.srem(self.keys.tenants, tenant_id)
                await pipe.execute()

        await self.client.run("delete_tenant", delete)

    # -- API keys ----------------------------------------------------------------------------

    async def create_api_key(self, tenant_id: str, name: str = "") -> tuple[ApiKeyRecord, str]:
        """A new key of the tenant: its record and the key as the client must hold it (shown once)."""
        await self.get_tenant(tenant_id)
        check_name(name)
        key_id = "k" + secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)  # 43 characters, 256 bits
        record = ApiKeyRecord(key_id, tenant_id, name, _now_ms(), None, None)
        fields = {
            "key_id": key_id,
            "tenant_id": tenant_id,
            "name": name,
            "sha256": secret_digest(secret),
            "created_ms": str(record.created_ms),
            "last_used_ms": "",
            "revoked_ms": "",
        }

        async def write() -> None:
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.keys.api_key(key_id), mapping=fields)
                pipe.sadd(self.keys.tenant_keys(tenant_id), key_id)
                await pipe.execute()

        await self.client.run("create_api_key", write)
        return record, f"{API_KEY_PREFIX}{key_id}.{secret}"

    async def list_api_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        await self.get_tenant(tenant_id)
        redis = self.client.redis
        ids = await self.client.run("list_api_keys", lambda: redis.smembers(self.keys.tenant_keys(tenant_id)))

        async def fetch() -> list[Any]:
            async with redis.pipeline(transaction=False) as pipe:
                for kid in ids:
                    pipe.hgetall(self.keys.api_key(kid.decode()))
                return await pipe.execute()

        rows = await self.client.run("list_api_keys", fetch) if ids else []
        records = (ApiKeyRecord.from_hash(d) for d in rows if d)
        return sorted((r for r in records if r.tenant_id == tenant_id), key=lambda r: (r.created_ms, r.key_id))

    async def get_api_key(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        check_id("tenant_id", tenant_id)
        check_id("key_id", key_id)
        data = await self.client.run("get_api_key", lambda: self.client.redis.hgetall(self.keys.api_key(key_id)))
        if not data or _text(data).get("tenant_id") != tenant_id:
            raise NotFoundError(f"key_id: tenant {tenant_id!r} has no API key {key_id!r}")
        return ApiKeyRecord.from_hash(data)

    async def revoke_api_key(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        """Mark the key revoked (kept for the audit trail, unusable from now on); idempotent."""
        record = await self.get_api_key(tenant_id, key_id)
        if record.revoked:
            return record
        now = _now_ms()
        key = self.keys.api_key(key_id)
        await self.client.run("revoke_api_key", lambda: self.client.redis.hset(key, "revoked_ms", str(now)))
        return replace(record, revoked_ms=now)

    async def authenticate_api_key(self, presented: str) -> ApiKeyRecord:
        """The record of a valid, unrevoked key (its last use set to now); UnauthenticatedError otherwise.
        The message never contains what was presented."""
        match = _API_KEY_RE.match(presented) if isinstance(presented, str) else None
        if match is None:
            raise UnauthenticatedError(f"api key: malformed; expected {API_KEY_PREFIX}<key id>.<secret>")
        key_id, secret = match.groups()
        key = self.keys.api_key(key_id)
        data = await self.client.run("authenticate_api_key", lambda: self.client.redis.hgetall(key))
        text = _text(data) if data else {}
        stored = text.get("sha256") or _DUMMY_DIGEST  # compare even for an unknown key: same cost
        matches = hmac.compare_digest(stored.encode(), secret_digest(secret).encode())
        if not data or not matches or text.get("revoked_ms"):
            raise UnauthenticatedError(f"api key: {_BAD_KEY}")
        now = _now_ms()

        async def touch() -> int:
            # Only while the key still exists unrevoked: a concurrent revoke or delete wins.
            if self.__dict__.get("_touch_key") is None:
                self.__dict__["_touch_key"] = self.client.redis.register_script(_TOUCH)
            return int(await self.__dict__["_touch_key"](keys=[key], args=[str(now)]))

        if not await self.client.run("authenticate_api_key", touch):
            raise UnauthenticatedError(f"api key: {_BAD_KEY}")
        return replace(ApiKeyRecord.from_hash(data), last_used_ms=now)
