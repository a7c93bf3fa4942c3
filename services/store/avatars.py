"""Avatars: the portrait a tenant uploaded for each avatar, its metadata, and invalidating caches.

    P:tenant:{tid}:avatar:{aid}   the portrait bytes (JPEG/PNG as uploaded)
    P:tenant:{tid}:avatars        avatar_id -> JSON metadata (`records.AvatarInfo`: created_ms, bytes,
                                  format, width, height, sha256)
    P:avatar-invalidated          JSON {tenant_id, avatar_id} when a portrait is replaced or deleted

Portraits are durable (no TTL, not touched by reaping): decoders rebuild an avatar's encoding from
them whenever they need it. Caches of an encoding are keyed by the portrait's sha256
(`avatar_digest`), so a replaced portrait can never serve the old encoding even when the
invalidation message is missed; the message (`avatar_invalidations`) frees the memory at once.
Another tenant's avatar answers exactly as an unknown one (AvatarNotFoundError): avatars live
under the tenant's own keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

from services.store.client import UNAVAILABLE, StoreClient
from services.store.keys import KeySchema
from services.store.records import AvatarInfo
from services.store.validation import MAX_PORTRAIT_BYTES, check_blob
from services.wire.errors import AvatarNotFoundError, ValidationError
from services.wire.ids import check_id
from services.wire.images import image_header


def _ids(tenant_id: str, avatar_id: str) -> None:
    check_id("tenant_id", tenant_id)
    check_id("avatar_id", avatar_id)


def portrait_info(tenant_id: str, avatar_id: str, data: bytes, created_ms: int = 0) -> AvatarInfo:
    """The metadata of portrait bytes (format and size read from the header, without decoding)."""
    header = image_header(data)
    image_format, width, height = header if header is not None else ("unknown", 0, 0)
    sha = hashlib.sha256(data).hexdigest()
    return AvatarInfo(tenant_id, avatar_id, created_ms, len(data), image_format, width, height, sha)


class AvatarOps:
    """The avatar operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    def _event(self, tenant_id: str, avatar_id: str) -> str:
        return json.dumps({"tenant_id": tenant_id, "avatar_id": avatar_id}, sort_keys=True)

    async def put_avatar(self, tenant_id: str, avatar_id: str, portrait: bytes) -> AvatarInfo:
        """Store (or replace) the portrait image bytes of the tenant's avatar, with its metadata.

        The same bytes again change nothing; other bytes replace portrait and metadata at once and
        announce the avatar on the invalidated channel. Returns the stored metadata.
        """
        _ids(tenant_id, avatar_id)
        data = check_blob("portrait", portrait, MAX_PORTRAIT_BYTES)
        if not data:
            raise ValidationError("portrait", "empty; expected the JPEG or PNG bytes of the portrait")
        info = portrait_info(tenant_id, avatar_id, data)
        meta = json.loads(info.to_json())
        del meta["created_ms"]  # the script stamps it with the Redis clock
        keys = [self.keys.avatar(tenant_id, avatar_id), self.keys.tenant_avatars(tenant_id)]
        keys.append(self.keys.avatar_invalidated_channel)
        args = [avatar_id, data, info.sha256, json.dumps(meta), self._event(tenant_id, avatar_id)]
        await self.client.script("put_avatar", keys, args)
        return await self.avatar_info(tenant_id, avatar_id)

    async def get_avatar(self, tenant_id: str, avatar_id: str) -> bytes:
        """The portrait bytes of the tenant's avatar; AvatarNotFoundError when the tenant has no such avatar."""
        _ids(tenant_id, avatar_id)
        key = self.keys.avatar(tenant_id, avatar_id)
        data = await self.client.run("get_avatar", lambda: self.client.redis.get(key))
        if data is None:
            raise AvatarNotFoundError(tenant_id, avatar_id)
        return bytes(data)

    async def avatar_info(self, tenant_id: str, avatar_id: str) -> AvatarInfo:
        """The metadata of the tenant's avatar; AvatarNotFoundError when it has none.

        A portrait stored before metadata was recorded gets it now (computed from the bytes).
        """
        _ids(tenant_id, avatar_id)
        index = self.keys.tenant_avatars(tenant_id)
        text = await self.client.run("avatar_info", lambda: self.client.redis.hget(index, avatar_id))
        if text is not None:
            return AvatarInfo.from_json(tenant_id, avatar_id, text)
        data = await self.get_avatar(tenant_id, avatar_id)  # AvatarNotFoundError: no such avatar
        info = portrait_info(tenant_id, avatar_id, data)
        await self.client.run("avatar_info", lambda: self.client.redis.hsetnx(index, avatar_id, info.to_json()))
        return info

    async def avatar_digest(self, tenant_id: str, avatar_id: str) -> str:
        """The sha256 of the avatar's current portrait (what caches of its encoding are keyed by)."""
        return (await self.avatar_info(tenant_id, avatar_id)).sha256

    async def list_avatars(self, tenant_id: str) -> list[AvatarInfo]:
        """The tenant's avatars, oldest first."""
        check_id("tenant_id", tenant_id)
        index = self.keys.tenant_avatars(tenant_id)
        entries = await self.client.run("list_avatars", lambda: self.client.redis.hgetall(index))
        infos = [AvatarInfo.from_json(tenant_id, aid.decode(), text) for aid, text in entries.items()]
        return sorted(infos, key=lambda info: (info.created_ms, info.avatar_id))

    async def delete_avatar(self, tenant_id: str, avatar_id: str) -> None:
        """Delete the avatar's portrait and metadata and announce it on the invalidated channel
        (caches drop its encoding; a session started afterwards gets NOT_FOUND).
        AvatarNotFoundError for an unknown avatar (or another tenant's)."""
        _ids(tenant_id, avatar_id)
        keys = [self.keys.avatar(tenant_id, avatar_id), self.keys.tenant_avatars(tenant_id)]
        keys.append(self.keys.avatar_invalidated_channel)
        reply = await self.client.script("delete_avatar", keys, [avatar_id, self._event(tenant_id, avatar_id)])
        if reply[0] == "not_found":
            raise AvatarNotFoundError(tenant_id, avatar_id)

    async def avatar_invalidations(self, subscribed: Any = None) -> AsyncIterator[tuple[str, str]]:
        """(tenant_id, avatar_id) of each avatar replaced or deleted from now on (pub/sub, best effort:
        caches key encodings by digest as well). `subscribed`, an asyncio.Event, is set once listening."""
        pubsub = self.client.redis.pubsub()
        try:
            await self.client.run("subscribe", lambda: pubsub.subscribe(self.keys.avatar_invalidated_channel))
            if subscribed is not None:
                subscribed.set()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is None or message["type"] != "message":
                    continue
                try:
                    event = json.loads(message["data"])
                    yield str(event["tenant_id"]), str(event["avatar_id"])
                except (ValueError, KeyError, TypeError):
                    continue  # not ours: ignore
        except UNAVAILABLE as exc:
            raise self.client.unavailable("avatar_invalidations") from exc
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()
