"""Admin: a tenant's API keys (create: the key is shown once; list with last use; revoke)."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway import logs
from services.gateway.deps import AdminDep, GatewayDep
from services.gateway.routes.tenants import ERRORS
from services.gateway.schemas import ApiKey, ApiKeyCreate, ApiKeyCreated, ApiKeyList, PathId
from services.store.tenants import ApiKeyRecord

router = APIRouter(prefix="/v1/tenants/{tenant_id}/keys", tags=["API keys (admin)"], dependencies=[AdminDep])


def key_out(record: ApiKeyRecord) -> ApiKey:
    return ApiKey(**record.__dict__)


@router.post("", status_code=201, response_model=ApiKeyCreated, responses=ERRORS)
async def create_key(tenant_id: PathId, body: ApiKeyCreate, gateway: GatewayDep) -> ApiKeyCreated:
    record, secret = await gateway.store.create_api_key(tenant_id, body.name)
    logs.tenant_id.set(tenant_id)
    logs.log.info("api key created", extra={"event": "key.create", "created_key_id": record.key_id})
    return ApiKeyCreated(**record.__dict__, api_key=secret)


@router.get("", response_model=ApiKeyList, responses=ERRORS)
async def list_keys(tenant_id: PathId, gateway: GatewayDep) -> ApiKeyList:
    return ApiKeyList(keys=[key_out(k) for k in await gateway.store.list_api_keys(tenant_id)])


@router.get("/{key_id}", response_model=ApiKey, responses=ERRORS)
async def get_key(tenant_id: PathId, key_id: PathId, gateway: GatewayDep) -> ApiKey:
    return key_out(await gateway.store.get_api_key(tenant_id, key_id))


@router.delete("/{key_id}", response_model=ApiKey, responses=ERRORS)
async def revoke_key(tenant_id: PathId, key_id: PathId, gateway: GatewayDep) -> ApiKey:
    """Revoke the key: its next request fails (401), at every gateway replica."""
    record = await gateway.store.revoke_api_key(tenant_id, key_id)
    logs.tenant_id.set(tenant_id)
    logs.log.info("api key revoked", extra={"event": "key.revoke", "revoked_key_id": key_id})
    return key_out(record)
