"""Avatar portraits: the image bytes a tenant uploaded for each avatar (P:tenant:{tid}:avatar:{aid}).

Portraits are durable (no TTL, not touched by reaping): decoders and generators rebuild an avatar's
encoding from them whenever they need it.
"""

from __future__ import annotations

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.validation import MAX_PORTRAIT_BYTES, check_blob
from services.wire.errors import NotFoundError, ValidationError
from services.wire.ids import check_id


class AvatarOps:
    """The avatar operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def put_avatar(self, tenant_id: str, avatar_id: str, portrait: bytes) -> None:
        """Store (or replace) the portrait image bytes of the tenant's avatar."""
        check_id("tenant_id", tenant_id)
        check_id("avatar_id", avatar_id)
        data = check_blob("portrait", portrait, MAX_PORTRAIT_BYTES)
        if not data:
            raise ValidationError("portrait", "empty; expected the JPEG or PNG bytes of the portrait")
        key = self.keys.avatar(tenant_id, avatar_id)
        await self.client.run("put_avatar", lambda: self.client.redis.set(key, data))

    async def get_avatar(self, tenant_id: str, avatar_id: str) -> bytes:
        """The portrait bytes of the tenant's avatar; NotFoundError when the tenant has no such avatar."""
        check_id("tenant_id", tenant_id)
        check_id("avatar_id", avatar_id)
        key = self.keys.avatar(tenant_id, avatar_id)
        data = await self.client.run("get_avatar", lambda: self.client.redis.get(key))
        if data is None:
            raise NotFoundError(f"avatar_id: tenant {tenant_id!r} has no avatar {avatar_id!r}; upload its portrait")
        return bytes(data)
