"""Opening and closing one streaming session: the Start message, the session record, the generator's cache.

`open_session` checks Start and the token (a session token streams only its session,
`access.check_start_session`), the tenant's quotas (max_session_minutes left; the session
count is checked atomically by `SessionStore.create`), resolves the portrait (sent, a stored
avatar's, or the joined session's avatar), encodes it, creates the Redis record (or joins an
existing "pending"/"active" session of the tenant, which then counts once) and opens the
session on its generator replica; `close_session` frees the cache and every key of the session.
"""

from __future__ import annotations

import calendar
import contextlib
import time
import uuid
from dataclasses import dataclass, field

from services.ingress.access import check_start_session
from services.ingress.config import IngressSettings, Stages
from services.store import SessionStore
from services.store.quotas import DEFAULT_QUOTAS, TenantQuotas
from services.wire.errors import FailedPreconditionError, QuotaExceededError, ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb

__all__ = ["SessionContext", "check_minutes", "close_session", "open_session"]

JOINABLE = ("pending", "active")  # statuses of a session a Stream may attach to


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
    created: bool  # we created the Redis record (False: joined a session the gateway created)
    quotas: TenantQuotas = field(default_factory=lambda: DEFAULT_QUOTAS)  # as read at Start


def seconds_to_next_period(now: float | None = None) -> float:
    """Seconds until the next usage period (calendar month, UTC) begins."""
    now = time.time() if now is None else now
    year, month = time.gmtime(now)[:2]
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return max(0.0, calendar.timegm((year, month, 1, 0, 0, 0)) - now)


def check_minutes(tenant_id: str, quotas: TenantQuotas, used_s: float) -> None:
    """QuotaExceededError("max_session_minutes") once the period's generated time reaches the quota."""
    limit_s = quotas.max_session_minutes * 60.0
    if used_s >= limit_s:
        raise QuotaExceededError(
            "max_session_minutes",
            f"tenant {tenant_id!r} used {used_s / 60:.2f} of its {quotas.max_session_minutes:g} session minutes "
            "this month (UTC); raise the quota or wait for the next month",
            retry_after_s=seconds_to_next_period(),
        )


async def open_session(
    stages: Stages,
    store: SessionStore,
    settings: IngressSettings,
    tenant_id: str,
    start: pb.Start,
    token_session_id: str | None = None,
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
    check_start_session(start.session_id, token_session_id)
    joined = None
    if start.session_id:
        session_id = check_id("start.session_id", start.session_id)
        joined = await store.get(session_id, tenant_id)  # NOT_FOUND: unknown, or another tenant's
        if joined.status not in JOINABLE:
            raise FailedPreconditionError(
                f"start.session_id: session {session_id!r} is {joined.status!r}; expected one of {JOINABLE} "
                "(create a new session)"
            )
    quotas = await store.tenant_quotas(tenant_id)
    check_minutes(tenant_id, quotas, (await store.tenant_usage(tenant_id)).session_seconds)
    which = start.WhichOneof("avatar")
    if which == "portrait":
        portrait = start.portrait
        avatar_id = ""
    elif which == "avatar_id":
        avatar_id = check_id("start.avatar_id", start.avatar_id)
        portrait = await store.get_avatar(tenant_id, avatar_id)
    elif joined is not None:  # the avatar the session was created for
        avatar_id = joined.avatar_id
        portrait = await store.get_avatar(tenant_id, avatar_id)
    else:
        raise ValidationError("start.avatar", "expected avatar_id or portrait")
    encoded = await stages.encode_portrait(
        pb.EncodePortraitRequest(tenant_id=tenant_id, image=portrait, avatar_id=avatar_id)
    )
    if joined is not None:
        session_id = joined.session_id
        await store.heartbeat(session_id, tenant_id, status="active")  # already counted: no second slot
        created = False
    else:
        session_id = uuid.uuid4().hex
        # QuotaExceededError("max_concurrent_sessions"): counted and inserted atomically.
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
        quotas,
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
    """Free the generator's cache, then every Redis key of the session (created here or joined:
    the stream was the session; a closed session frees its slot of the tenant's quota)."""
    with contextlib.suppress(Exception):
        await stages.close_session(pb.CloseSessionRequest(session_id=ctx.session_id, tenant_id=ctx.tenant_id))
    with contextlib.suppress(Exception):  # usually gone already: the generator's CloseSession closes it
        await store.close(ctx.session_id, ctx.tenant_id)
