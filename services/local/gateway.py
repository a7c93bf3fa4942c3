"""The gateway beside the local Serve application: started by `avatar-forcing serve` once Serve is
ready, on the same Redis and secret, with an admin credential and a demo tenant with an API key.

LiveKit comes from LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET, as for `python -m
services.gateway`. The admin credential comes from AF_GATEWAY_ADMIN_TOKEN; without it the
launcher makes a random one for this run (printed, like the development token). The demo tenant
is created through the gateway's own admin API, so what the banner prints is what a customer's
operator would do."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from services.common.config import Settings
from services.gateway.server import GatewayHandle, serve_gateway
from services.gateway.settings import ADMIN_TOKEN_ENV, GatewaySettings, livekit_from_env
from services.local.errors import LauncherError

DEMO_TENANT = "demo"
REQUEST_TIMEOUT_S = 30.0  # the admin calls are Redis round trips; generous on a loaded machine


@dataclass
class LocalGateway:
    handle: GatewayHandle = field(repr=False)
    admin_token: str = field(repr=False)
    demo_api_key: str = field(repr=False)
    admin_token_generated: bool

    @property
    def url(self) -> str:
        return self.handle.url

    def stop(self) -> None:
        self.handle.stop()


def start_gateway(
    secret: str,
    grpc_target: str,
    redis_url: str,
    prefix: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    admin_token: str | None = None,
) -> LocalGateway:
    """Start the gateway (in this process) against Serve at `grpc_target` and the services' Redis
    (`prefix` None: the environment's), then make the demo tenant."""
    admin_token = (admin_token or os.environ.get(ADMIN_TOKEN_ENV, "")).strip()
    generated = not admin_token
    if generated:
        admin_token = "dev-admin-" + secrets.token_urlsafe(32)
    try:
        service = dataclasses.replace(Settings.from_env(), redis_url=redis_url)
        if prefix:
            service = dataclasses.replace(service, redis_prefix=prefix)
        settings = GatewaySettings(
            admin_token=admin_token,
            auth_secret=secret,
            service=service,
            serve_target=grpc_target,
            livekit=livekit_from_env(),  # LIVEKIT_URL/_API_KEY/_API_SECRET: sessions with a room get a bridge
        )
        handle = serve_gateway(settings, host=host, port=port)
    except (ValueError, RuntimeError, OSError) as exc:
        raise LauncherError(f"gateway: {exc}", exit_code=2) from None
    try:
        key = demo_api_key(handle.url, admin_token)
    except BaseException:
        handle.stop()
        raise
    return LocalGateway(handle, admin_token, key, generated)


def demo_api_key(url: str, admin_token: str) -> str:
    """A new API key of the demo tenant (the tenant is created when it does not exist yet)."""
    # None (409): the tenant is kept from an earlier run on a persistent Redis; it gets a new key.
    _admin_call(url, admin_token, "POST", "/v1/tenants", {"tenant_id": DEMO_TENANT, "name": "Demo"})
    answer = _admin_call(url, admin_token, "POST", f"/v1/tenants/{DEMO_TENANT}/keys", {"name": "avatar-forcing serve"})
    if not answer or "api_key" not in answer:
        raise LauncherError("gateway: creating the demo tenant's API key gave no key")
    return str(answer["api_key"])


def _admin_call(url: str, admin_token: str, method: str, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON answer of one admin request; None for 409 (already exists)."""
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        method=method,
        headers={"authorization": f"Bearer {admin_token}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        if exc.code == 409:
            return None
        detail = exc.read()[:500].decode(errors="replace")
        raise LauncherError(f"gateway: {method} {path} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LauncherError(f"gateway: {method} {path} failed: {exc}") from None
