"""Sessions of the caller's tenant: create (a session token for the gRPC stream and, with LiveKit
configured and a room named, a bridge dispatch), get (live status and figures), list, stop.

Another tenant's session answers 404 exactly as an unknown one."""

from __future__ import annotations

import contextlib
import time
import uuid

from fastapi import APIRouter

from services.common.auth import mint_token
from services.gateway import logs
from services.gateway.deps import GatewayDep, Principal, TenantDep
from services.gateway.livekit import BridgeJoin, BridgeLeave, avatar_identity, bridge_token
from services.gateway.routes.tenants import tenant_usage
from services.gateway.schemas import (
    ErrorBody,
    LiveKitInfo,
    PathId,
    Session,
    SessionCreate,
    SessionCreated,
    SessionList,
    SessionStopped,
    Usage,
)
from services.store.records import SessionRecord
from services.wire.errors import NotFoundError, QuotaExceededError

router = APIRouter(prefix="/v1", tags=["sessions"])
ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}, 429: {"model": ErrorBody}}
SESSION_SCOPE = "session"


def session_out(record: SessionRecord) -> Session:
    return Session(
        session_id=record.session_id,
        avatar_id=record.avatar_id,
        room=record.room,
        status=record.status,
        options=record.options,
        created_ms=record.created_ms,
        updated_ms=record.updated_ms,
        frame_cursor=record.frame_cursor,
        figures=record.figures,
    )


def seconds_to_next_period(now: float | None = None) -> float:
    t = time.gmtime(time.time() if now is None else now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    start = time.mktime((year, month, 1, 0, 0, 0, 0, 0, 0)) - time.timezone
    return max(1.0, start - time.time())


async def check_session_minutes(gateway: GatewayDep, principal: Principal) -> None:
    usage = await gateway.store.tenant_usage(principal.tenant_id)
    limit_s = principal.quotas.max_session_minutes * 60
    if usage.session_seconds >= limit_s:
        raise QuotaExceededError(
            "max_session_minutes",
            f"tenant {principal.tenant_id!r} used {usage.session_seconds / 60:.1f} of its "
            f"{principal.quotas.max_session_minutes:g} session minutes this month",
            retry_after_s=seconds_to_next_period(),
        )


@router.post("/sessions", status_code=201, response_model=SessionCreated, responses=ERRORS)
async def create_session(body: SessionCreate, principal: TenantDep, gateway: GatewayDep) -> SessionCreated:
    store, settings, tenant = gateway.store, gateway.settings, principal.tenant_id
    await store.avatar_info(tenant, body.avatar_id)  # 404 for an unknown (or another tenant's) avatar
    await check_session_minutes(gateway, principal)
    session_id = "ses_" + uuid.uuid4().hex
    logs.session_id.set(session_id)
    options = body.options.fields()
    record = await store.create(session_id, tenant, body.avatar_id, options=options, room=body.room, status="pending")
    issued = time.time()
    token = mint_token(tenant, settings.auth_secret, settings.session_token_ttl_s, scope=SESSION_SCOPE,
                       session_id=session_id)  # fmt: skip
    expires_ms = int((issued + settings.session_token_ttl_s) * 1000)
    livekit = None
    if body.room and settings.livekit is not None:
        identity = avatar_identity(session_id)
        order = BridgeJoin(
            session_id=session_id,
            tenant_id=tenant,
            avatar_id=body.avatar_id,
            room=body.room,
            livekit_url=settings.livekit.url,
            bridge_token=bridge_token(settings.livekit, body.room, session_id, body.agent_identity),
            session_token=token,
            avatar_identity=identity,
            agent_identity=body.agent_identity,
            grpc_target=settings.public_grpc_target,
            options=options,
            expires_ms=expires_ms,
        )
        try:
            dispatch_id = await gateway.dispatcher.join(order)
        except BaseException:
            with contextlib.suppress(Exception):  # no bridge, no session: nothing left behind
                await store.close(session_id, tenant)
            raise
        livekit = LiveKitInfo(
            url=settings.livekit.url,
            room=body.room,
            avatar_identity=identity,
            agent_identity=body.agent_identity,
            dispatch_id=dispatch_id,
        )
    logs.log.info("session created", extra={"event": "session.create", "avatar_id": body.avatar_id,
                                            "room": body.room, "dispatched": livekit is not None})  # fmt: skip
    return SessionCreated(
        **session_out(record).model_dump(),
        session_token=token,
        token_expires_ms=expires_ms,
        grpc_target=settings.public_grpc_target,
        livekit=livekit,
    )


@router.get("/sessions", response_model=SessionList, responses=ERRORS)
async def list_sessions(principal: TenantDep, gateway: GatewayDep) -> SessionList:
    return SessionList(sessions=[session_out(r) for r in await gateway.store.list_sessions(principal.tenant_id)])


@router.get("/sessions/{session_id}", response_model=Session, responses=ERRORS)
async def get_session(session_id: PathId, principal: TenantDep, gateway: GatewayDep) -> Session:
    logs.session_id.set(session_id)
    return session_out(await gateway.store.get(session_id, principal.tenant_id))


@router.delete("/sessions/{session_id}", response_model=SessionStopped, responses=ERRORS)
async def stop_session(session_id: PathId, principal: TenantDep, gateway: GatewayDep) -> SessionStopped:
    """Stop the session: a streamed one ends after its current block (status "stopping", the
    ingress closes it); one nobody streams yet is closed now. Its bridge is recalled."""
    store, tenant = gateway.store, principal.tenant_id
    logs.session_id.set(session_id)
    record = await store.get(session_id, tenant)
    status = "closed"
    if record.status == "pending":
        with contextlib.suppress(NotFoundError):
            await store.close(session_id, tenant)
    else:
        try:
            await store.request_stop(session_id, tenant)
            status = "stopping"
        except NotFoundError:  # it ended meanwhile
            pass
    if record.room and gateway.settings.livekit is not None:
        await gateway.dispatcher.leave(BridgeLeave(session_id, tenant, record.room, avatar_identity(session_id)))
    logs.log.info("session stopped", extra={"event": "session.stop", "status": status})
    return SessionStopped(session_id=session_id, status=status)


@router.get("/usage", response_model=Usage, responses=ERRORS, tags=["tenant"])
async def usage(principal: TenantDep, gateway: GatewayDep) -> Usage:
    """The caller's tenant: session time used this month and sessions open now."""
    return await tenant_usage(gateway, principal.tenant_id)
