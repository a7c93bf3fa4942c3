"""Tenant isolation on the serving side, against a real Redis: another tenant's session or avatar
answers exactly as an unknown id (NOT_FOUND, the same message: ids do not leak), session tokens
stream only their session, and avatars' metadata, deletion and cache invalidation.

The store's operations, the real servicers and the real `SessionPipeline` (the ingress, without
Ray) are driven here; the same checks through Serve's real gRPC proxy, one per public RPC, are
in test_serving_stack.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable
from typing import Any

import numpy as np
import pytest

from avatar_forcing.media.io import load_image
from services.decoder.servicer import DecoderServicer
from services.ingress.config import IngressSettings
from services.ingress.pipeline import SessionPipeline
from services.store import SessionStore
from services.wire.errors import (
    AvatarNotFoundError,
    NotFoundError,
    SessionNotFoundError,
    ValidationError,
    status_of,
)
from services.wire.images import encode_image
from services.wire.protos import pb
from services.wire.tensors import encode
from tests.integration.conftest import SAMPLES
from tests.integration.test_session_pipeline import client_messages, iterate, stages_for
from tests.redis_support import keys_with

pytestmark = pytest.mark.integration


async def error_of(operation: Awaitable[Any]) -> BaseException:
    try:
        await operation
    except Exception as exc:
        return exc
    raise AssertionError("expected an error")


def flipped_png() -> bytes:
    image = load_image(SAMPLES / "portrait.png")[:, ::-1].copy()
    return encode_image(image, pb.PNG).data


# -- the store -------------------------------------------------------------------------------------


def test_every_store_operation_answers_another_tenants_session_as_unknown(redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            await s.replica_heartbeat("r1")
            await s.create("a1", "tenantA", "av1")
            claim = await s.claim("a1", "tenantA", "r1")
            await s.put_avatar("tenantA", "av1", (SAMPLES / "portrait.png").read_bytes())

            def session_ops(sid: str) -> list[Awaitable[Any]]:
                return [
                    s.get(sid, "tenantB"),
                    s.heartbeat(sid, "tenantB", status="active"),
                    s.claim(sid, "tenantB", "r1"),
                    s.append_block(sid, "tenantB", claim, 0, 10, b"x"),
                    s.put_state(sid, "tenantB", claim, b"x"),
                    s.snapshot(sid, "tenantB"),
                    s.release(sid, "tenantB", "r1", claim.epoch),
                    s.request_stop(sid, "tenantB"),
                    s.set_figures(sid, "tenantB", {"frames": 1}),
                    s.close(sid, "tenantB"),
                ]

            for foreign, unknown in zip(session_ops("a1"), session_ops("zz"), strict=True):
                mine, none = await error_of(foreign), await error_of(unknown)
                assert isinstance(mine, SessionNotFoundError) and isinstance(none, SessionNotFoundError)
                assert status_of(mine)[0].name == "NOT_FOUND"
                assert str(mine) == str(none).replace("'zz'", "'a1'")  # the very same message

            def avatar_ops(aid: str) -> list[Awaitable[Any]]:
                return [s.get_avatar("tenantB", aid), s.avatar_info("tenantB", aid), s.delete_avatar("tenantB", aid)]

            for foreign, unknown in zip(avatar_ops("av1"), avatar_ops("zz"), strict=True):
                mine, none = await error_of(foreign), await error_of(unknown)
                assert isinstance(mine, AvatarNotFoundError) and isinstance(none, AvatarNotFoundError)
                assert str(mine) == str(none).replace("'zz'", "'av1'")
            assert await s.list_avatars("tenantB") == []

            record = await s.get("a1", "tenantA")  # nothing of tenant A was touched
            assert (record.status, record.owner, record.figures) == ("pending", "r1", {})
            assert (await s.avatar_info("tenantA", "av1")).avatar_id == "av1"

    asyncio.run(main())


def test_session_lifecycle_stop_and_figures(redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            record = await s.create("s1", "t1", "av1", status="pending", room="room-1", options={"block": 10})
            assert (record.status, record.room, record.figures) == ("pending", "room-1", {})
            await s.heartbeat("s1", "t1", status="active")
            figures = {"frames": 20, "degraded_frames": 0, "block_latency_p50_ms": 120.5}
            await s.set_figures("s1", "t1", figures)
            assert (await s.get("s1", "t1")).figures == figures
            await s.request_stop("s1", "t1")
            await s.heartbeat("s1", "t1", status="active")  # a heartbeat never undoes a requested stop
            assert (await s.get("s1", "t1")).status == "stopping"
            await s.request_stop("s1", "t1")  # idempotent
            assert [r.status for r in await s.list_sessions("t1")] == ["stopping"]
            for bad in ({"frames": float("nan")}, {"Frames": 1}, {"frames": "1"}, {f"f{i}": 1 for i in range(17)}):
                with pytest.raises(ValidationError) as info:
                    await s.set_figures("s1", "t1", bad)
                assert info.value.field.startswith("figures")
            with pytest.raises(ValidationError, match="status"):
                await s.create("s2", "t1", "av1", status="created")

    asyncio.run(main())


# -- avatars ---------------------------------------------------------------------------------------


def test_avatar_metadata_listing_deletion_and_invalidation_messages(redis_url, prefix):
    portrait, other = (SAMPLES / "portrait.png").read_bytes(), flipped_png()

    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            subscribed, events = asyncio.Event(), []

            async def listen():
                async for event in s.avatar_invalidations(subscribed):
                    events.append(event)

            listener = asyncio.create_task(listen())
            await asyncio.wait_for(subscribed.wait(), 10)
            info = await s.put_avatar("t1", "a1", portrait)
            assert (info.format, info.width, info.height, info.bytes) == ("PNG", 256, 256, len(portrait))
            assert info.sha256 == hashlib.sha256(portrait).hexdigest() and info.created_ms > 0
            stored = json.loads(await s.redis.hget(s.keys.tenant_avatars("t1"), "a1"))
            assert set(stored) == {"created_ms", "bytes", "format", "width", "height", "sha256"}
            assert await s.put_avatar("t1", "a1", portrait) == info  # the same bytes: nothing changes
            await s.put_avatar("t1", "a2", other)
            assert [i.avatar_id for i in await s.list_avatars("t1")] == ["a1", "a2"]

            replaced = await s.put_avatar("t1", "a1", other)  # replaced: announced
            assert replaced.sha256 == hashlib.sha256(other).hexdigest() and await s.get_avatar("t1", "a1") == other
            await s.delete_avatar("t1", "a2")  # deleted: announced
            with pytest.raises(AvatarNotFoundError):
                await s.get_avatar("t1", "a2")
            with pytest.raises(NotFoundError):
                await s.delete_avatar("t1", "a2")
            assert [i.avatar_id for i in await s.list_avatars("t1")] == ["a1"]
            assert keys_with(redis_url, f"{prefix}:tenant:t1:avatar:a2") == []

            # A portrait stored before metadata existed gets it on first read.
            await s.redis.set(s.keys.avatar("t1", "old"), portrait)
            assert (await s.avatar_info("t1", "old")).sha256 == info.sha256
            for _ in range(200):
                if len(events) >= 2:
                    break
                await asyncio.sleep(0.05)
            listener.cancel()
            assert events == [("t1", "a1"), ("t1", "a2")]

    asyncio.run(main())


def decode_request(avatar_id: str) -> pb.DecodeRequest:
    latents = np.random.default_rng(0).standard_normal((2, 512)).astype(np.float32)
    return pb.DecodeRequest(
        session_id="s", tenant_id="t1", avatar_id=avatar_id, latents=encode(latents, "l"), format=pb.RAW_RGB
    )


def test_decoder_cache_drops_deleted_and_replaced_portraits(model, redis_url, prefix):
    portrait, other = (SAMPLES / "portrait.png").read_bytes(), flipped_png()

    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            await s.put_avatar("t1", "a1", portrait)
            watching = DecoderServicer(model, s, cache_bytes=1 << 30)
            deaf = DecoderServicer(model, s, cache_bytes=1 << 30)  # never subscribes: misses every message
            subscribed = asyncio.Event()
            watcher = asyncio.create_task(watching.watch_invalidations(subscribed))
            await asyncio.wait_for(subscribed.wait(), 10)
            before = [f.image.data for f in (await watching.Decode(decode_request("a1"))).frames]
            assert [f.image.data for f in (await deaf.Decode(decode_request("a1"))).frames] == before
            assert ("t1", "a1") in watching.cache and ("t1", "a1") in deaf.cache

            await s.put_avatar("t1", "a1", other)  # replaced
            for _ in range(200):  # the message drops the stale encoding
                if ("t1", "a1") not in watching.cache:
                    break
                await asyncio.sleep(0.05)
            assert ("t1", "a1") not in watching.cache
            fresh = DecoderServicer(model, s, cache_bytes=1 << 30)
            expected = [f.image.data for f in (await fresh.Decode(decode_request("a1"))).frames]
            assert expected != before
            # Both serve the new portrait: the one that missed the message too (digest-keyed).
            assert [f.image.data for f in (await watching.Decode(decode_request("a1"))).frames] == expected
            assert [f.image.data for f in (await deaf.Decode(decode_request("a1"))).frames] == expected

            await s.delete_avatar("t1", "a1")
            unknown = await error_of(deaf.Decode(decode_request("never")))
            for servicer in (watching, deaf):  # deleted: NOT_FOUND at once, as an unknown avatar
                error = await error_of(servicer.Decode(decode_request("a1")))
                assert isinstance(error, NotFoundError)
                assert str(error) == str(unknown).replace("'never'", "'a1'")
            watcher.cancel()
            for servicer in (watching, deaf, fresh):
                servicer.close()

    asyncio.run(main())


# -- the ingress: Start ----------------------------------------------------------------------------


def start_messages(media, **start: Any):
    """The sample session's messages with Start's fields replaced (`start`)."""
    messages = list(client_messages(*media))
    first = messages[0].start
    if "avatar_id" in start or start.get("no_avatar"):
        first.ClearField("portrait")
    start.pop("no_avatar", None)
    for name, value in start.items():
        setattr(first, name, value)
    return messages


async def stream(stages, store, tenant: str, messages, token_session_id: str | None = None):
    """(server messages, the error the stream ended with or None)."""
    pipeline = SessionPipeline(
        stages, store, IngressSettings(image_size=64, degrade=False), tenant, token_session_id=token_session_id
    )
    out: list[pb.ServerMessage] = []
    try:
        async for message in pipeline.run(iterate(messages)):
            out.append(message)
    except Exception as exc:
        return out, exc
    return out, None


def test_session_tokens_and_other_tenants_at_stream_start(model, media, redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            stages = stages_for(model, s)
            await s.put_avatar("acme", "ava", media[0])
            await s.create("sess-a", "acme", "ava", status="pending")  # as the gateway creates them
            await s.create("sess-b", "acme", "ava", status="pending")
            await s.create("sess-e", "evil", "ava", status="pending")

            # A session token for sess-a: not another session, not an empty session_id.
            _, unknown = await stream(stages, s, "acme", start_messages(media, session_id="nope"), "nope")
            _, other = await stream(stages, s, "acme", start_messages(media, session_id="sess-b"), "sess-a")
            assert isinstance(other, SessionNotFoundError) and str(other) == str(unknown).replace("nope", "sess-b")
            _, empty = await stream(stages, s, "acme", start_messages(media), "sess-a")
            assert isinstance(empty, ValidationError) and empty.field == "start.session_id"

            # Another tenant's session and avatar: exactly as unknown ones.
            _, foreign = await stream(stages, s, "evil", start_messages(media, session_id="sess-a"))
            _, none = await stream(stages, s, "evil", start_messages(media, session_id="nope"))
            assert isinstance(foreign, SessionNotFoundError) and str(foreign) == str(none).replace("nope", "sess-a")
            _, foreign = await stream(stages, s, "evil", start_messages(media, avatar_id="ava"))
            _, none = await stream(stages, s, "evil", start_messages(media, avatar_id="nope"))
            assert isinstance(foreign, NotFoundError) and str(foreign) == str(none).replace("nope", "ava")
            assert [r.status for r in await s.list_sessions("acme")] == ["pending", "pending"]  # untouched

            # The token's own session streams, with the avatar it was created for.
            out, error = await stream(
                stages, s, "acme", start_messages(media, session_id="sess-a", no_avatar=True), "sess-a"
            )
            assert error is None, error
            assert out[0].started.session_id == "sess-a"
            assert [m.frame.frame_index for m in out if m.WhichOneof("message") == "frame"] == list(range(40))
            assert [r.session_id for r in await s.list_sessions("acme")] == ["sess-b"]  # sess-a closed

            # After delete_avatar, a session naming it is NOT_FOUND.
            await s.delete_avatar("acme", "ava")
            _, gone = await stream(stages, s, "acme", start_messages(media, avatar_id="ava"))
            assert isinstance(gone, NotFoundError) and str(gone) == str(none).replace("'evil'", "'acme'").replace(
                "nope", "ava"
            )

    asyncio.run(main())
