"""Admin: tenants (create, list, get with usage, update name and quotas, delete with everything they own)."""

from __future__ import annotations

import contextlib

from fastapi import APIRouter, Response

from services.gateway import logs
from services.gateway.deps import AdminDep, GatewayDep
from services.gateway.livekit import BridgeLeave, avatar_identity
from services.gateway.schemas import ErrorBody, PathId, Quotas, Tenant, TenantCreate, TenantList, TenantUpdate, Usage
from services.store.quotas import DEFAULT_QUOTAS, TenantQuotas
from services.store.tenants import TenantRecord
from services.wire.errors import NotFoundError

router = APIRouter(prefix="/v1/tenants", tags=["tenants (admin)"], dependencies=[AdminDep])
ERRORS = {401: {"model": ErrorBody}, 404: {"model": ErrorBody}, 422: {"model": ErrorBody}}


def quotas_out(quotas: TenantQuotas) -> Quotas:
    return Quotas(**quotas.__dict__)


def tenant_out(record: TenantRecord, usage: Usage | None = None) -> Tenant:
    return Tenant(
        tenant_id=record.tenant_id,
        name=record.name,
        created_ms=record.created_ms,
        quotas=quotas_out(record.quotas),
        usage=usage,
    )


async def tenant_usage(gateway: GatewayDep, tenant_id: str) -> Usage:
    usage = await gateway.store.tenant_usage(tenant_id)
    return Usage(
        period=usage.period,
        session_seconds=usage.session_seconds,
        session_minutes=usage.session_seconds / 60,
        active_sessions=usage.active_sessions,
    )


@router.post("", status_code=201, response_model=Tenant, responses=ERRORS | {409: {"model": ErrorBody}})
async def create_tenant(body: TenantCreate, gateway: GatewayDep) -> Tenant:
    changes = body.quotas.changes() if body.quotas is not None else {}
    quotas = TenantQuotas(**(DEFAULT_QUOTAS.__dict__ | changes))
    record = await gateway.store.create_tenant(body.tenant_id, body.name, quotas)
    logs.tenant_id.set(record.tenant_id)
    logs.log.info("tenant created", extra={"event": "tenant.create"})
    return tenant_out(record)


@router.get("", response_model=TenantList, responses=ERRORS)
async def list_tenants(gateway: GatewayDep) -> TenantList:
    return TenantList(tenants=[tenant_out(t) for t in await gateway.store.list_tenants()])


@router.get("/{tenant_id}", response_model=Tenant, responses=ERRORS)
async def get_tenant(tenant_id: PathId, gateway: GatewayDep) -> Tenant:
    record = await gateway.store.get_tenant(tenant_id)
    return tenant_out(record, await tenant_usage(gateway, tenant_id))


@router.patch("/{tenant_id}", response_model=Tenant, responses=ERRORS)
async def update_tenant(tenant_id: PathId, body: TenantUpdate, gateway: GatewayDep) -> Tenant:
    changes = body.quotas.changes() if body.quotas is not None else None
    record = await gateway.store.update_tenant(tenant_id, name=body.name, quotas=changes)
    logs.tenant_id.set(tenant_id)
    logs.log.info("tenant updated", extra={"event": "tenant.update"})
    return tenant_out(record)


@router.delete("/{tenant_id}", status_code=204, response_class=Response, responses=ERRORS)
async def delete_tenant(tenant_id: PathId, gateway: GatewayDep) -> Response:
    """Delete the tenant and everything it owns: its sessions are stopped and closed (bridges
    recalled), its avatars deleted (caches invalidated), its API keys and usage removed."""
    store = gateway.store
    await store.get_tenant(tenant_id)
    logs.tenant_id.set(tenant_id)
    for session in await store.list_sessions(tenant_id):
        if session.room and gateway.settings.livekit is not None:
            leave = BridgeLeave(session.session_id, tenant_id, session.room, avatar_identity(session.session_id))
            await gateway.dispatcher.leave(BridgeLeave(**(leave.__dict__ | {"reason": "tenant_deleted"})))
        with contextlib.suppress(NotFoundError):  # ended meanwhile
            await store.close(session.session_id, tenant_id)
    for avatar in await store.list_avatars(tenant_id):
        with contextlib.suppress(NotFoundError):
            await store.delete_avatar(tenant_id, avatar.avatar_id)
    await store.delete_tenant_record(tenant_id)
    logs.log.info("tenant deleted", extra={"event": "tenant.delete"})
    return Response(status_code=204)
