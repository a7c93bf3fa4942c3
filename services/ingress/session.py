"""Opening and closing one streaming session: the Start message, the session record, the generator's cache.

`open_session` checks Start, resolves the portrait (sent, or a stored avatar's), encodes it,
creates the Redis record (or joins an existing session of the tenant) and opens the session on
its generator replica; `close_session` frees the cache and, for a session it created, every key.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass

from services.ingress.config import IngressSettings, Stages
from services.store import SessionStore
from services.wire.errors import ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb

__all__ = ["SessionContext", "close_session", "open_session"]


@dataclass
class SessionContext:
    session_id: str
    tenant_id: str
    avatar_id: str
    block: int
    nfe: int
    output_format: int
    jpeg_quality: int
    width: int
    height: int
    created: bool  # we created the Redis record (so we delete it at the end)


async def open_session(
    stages: Stages, store: SessionStore, settings: IngressSettings, tenant_id: str, start: pb.Start
) -> SessionContext:
    options = start.options
    block = options.block if options.HasField("block") else 10
    nfe = options.nfe if options.HasField("nfe") else 10
    output_format = start.output_format or pb.JPEG
    if output_format not in (pb.RAW_RGB, pb.JPEG):
        raise ValidationError("start.output_format", f"got {output_format}; expected RAW_RGB or JPEG")
    quality = start.jpeg_quality or 85
    if not 1 <= quality <= Limit.MAX_JPEG_QUALITY:
        raise ValidationError("start.jpeg_quality", f"got {quality}; expected [1, {Limit.MAX_JPEG_QUALITY}]")
    which = start.WhichOneof("avatar")
    if which == "portrait":
        portrait = start.portrait
        avatar_id = ""
    elif which == "avatar_id":
        avatar_id = check_id("start.avatar_id", start.avatar_id)
        portrait = await store.get_avatar(tenant_id, avatar_id)
    else:
        raise ValidationError("start.avatar", "expected avatar_id or portrait")
    encoded = await stages.encode_portrait(
        pb.EncodePortraitRequest(tenant_id=tenant_id, image=portrait, avatar_id=avatar_id)
    )
    if start.session_id:
        session_id = check_id("start.session_id", start.session_id)
        await store.get(session_id, tenant_id)  # NOT_FOUND / PERMISSION_DENIED
        created = False
    else:
        session_id = uuid.uuid4().hex
        await store.create(session_id, tenant_id, encoded.avatar_id, status="active")
        created = True
    ctx = SessionContext(
        session_id,
        tenant_id,
        encoded.avatar_id,
        block,
        nfe,
        output_format,
        quality,
        settings.image_size,
        settings.image_size,
        created,
    )
    try:
        await stages.open_session(
            pb.OpenSessionRequest(
                session_id=session_id,
                tenant_id=tenant_id,
                options=options,
                reference_motion=encoded.reference_motion,
                avatar_id=encoded.avatar_id,
            )
        )
    except BaseException:
        await close_session(stages, store, ctx)
        raise
    return ctx


async def close_session(stages: Stages, store: SessionStore, ctx: SessionContext) -> None:
    """Free the generator's cache, then (for sessions we created) every Redis key."""
    with contextlib.suppress(Exception):
        await stages.close_session(pb.CloseSessionRequest(session_id=ctx.session_id, tenant_id=ctx.tenant_id))
    if ctx.created:
        with contextlib.suppress(Exception):
            await store.close(ctx.session_id, ctx.tenant_id)
