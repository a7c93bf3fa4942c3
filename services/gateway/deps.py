"""The dependencies of the routes: the gateway's state, the admin credential, API key -> tenant.

    Authorization: Bearer <AF_GATEWAY_ADMIN_TOKEN>   admin routes (/v1/tenants...)
    Authorization: Bearer afk_<key id>.<secret>      tenant routes (/v1/avatars, /v1/sessions, /v1/usage)

A tenant request is authenticated (the key is looked up in Redis on every request: a revoked key
fails at once), then counted against the key's rate limit (its tenant's requests_per_minute,
Redis-backed), and answers carry X-RateLimit-Limit / -Remaining / -Reset.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from services.gateway import logs
from services.gateway.state import Gateway
from services.store.quotas import TenantQuotas
from services.wire.errors import UnauthenticatedError

admin_scheme = HTTPBearer(
    scheme_name="AdminToken", description="the admin credential (AF_GATEWAY_ADMIN_TOKEN)", auto_error=False
)
key_scheme = HTTPBearer(scheme_name="ApiKey", description="a tenant's API key: afk_<key id>.<secret>", auto_error=False)


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


def _credential(credentials: HTTPAuthorizationCredentials | None, what: str) -> str:
    if credentials is None or not credentials.credentials:
        raise UnauthenticatedError(f"authorization: missing; expected `Authorization: Bearer <{what}>`")
    return credentials.credentials


async def require_admin(
    gateway: GatewayDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_scheme)]
) -> None:
    presented = _credential(credentials, "admin token")
    if not hmac.compare_digest(presented.encode(), gateway.settings.admin_token.encode()):
        raise UnauthenticatedError("authorization: not the admin token")
    logs.key_id.set("admin")


@dataclass(frozen=True)
class Principal:
    tenant_id: str
    key_id: str
    quotas: TenantQuotas


async def require_tenant(
    gateway: GatewayDep,
    response: Response,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(key_scheme)],
) -> Principal:
    presented = _credential(credentials, "API key")
    key = await gateway.store.authenticate_api_key(presented)
    logs.tenant_id.set(key.tenant_id)
    logs.key_id.set(key.key_id)
    quotas = await gateway.store.tenant_quotas(key.tenant_id)
    decision = await gateway.store.check_rate(key.key_id, quotas.requests_per_minute)
    response.headers["X-RateLimit-Limit"] = str(decision.limit)
    response.headers["X-RateLimit-Remaining"] = str(decision.remaining)
    response.headers["X-RateLimit-Reset"] = f"{decision.reset_s:.3f}"
    return Principal(key.tenant_id, key.key_id, quotas)


AdminDep = Depends(require_admin)
TenantDep = Annotated[Principal, Depends(require_tenant)]
