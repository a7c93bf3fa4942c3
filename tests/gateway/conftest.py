"""Fixtures of the gateway tests: the app on real Redis (one key prefix per test) with the real
MotionEncoder servicer in-process (tiny preset), admin and tenant helpers."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.common.config import Settings
from services.gateway import GatewaySettings, LiveKitSettings, create_app
from services.gateway.encoder import InProcessEncoder
from services.store import SessionStore

SAMPLES = Path(__file__).parents[2] / "samples"
ADMIN_TOKEN = "admin-" + "a" * 40
SECRET = "gateway-test-secret-" + "s" * 32
LIVEKIT = LiveKitSettings("ws://127.0.0.1:1", "devkey", "livekit-test-secret-" + "l" * 32, kick_on_stop=True)
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="session")
def portrait() -> bytes:
    return (SAMPLES / "portrait.png").read_bytes()


@pytest.fixture(scope="session")
def tiny_model():
    from avatar_forcing.config import tiny
    from avatar_forcing.nn.model import random_model

    return random_model(tiny(), seed=0)


def gateway_settings(redis_url: str, prefix: str, livekit: LiveKitSettings | None = LIVEKIT) -> GatewaySettings:
    return GatewaySettings(
        admin_token=ADMIN_TOKEN,
        auth_secret=SECRET,
        service=Settings(redis_url=redis_url, redis_prefix=prefix, replica_id="gateway-test"),
        serve_target="127.0.0.1:1",  # no Serve here: /readyz says so
        livekit=livekit,
    )


@dataclass
class Api:
    """A TestClient with helpers for the admin and one tenant."""

    client: TestClient
    settings: GatewaySettings

    def tenant(self, tenant_id: str, **quotas: Any) -> dict[str, str]:
        """Create the tenant (with quotas) and a key; returns the key's Authorization header."""
        body: dict[str, Any] = {"tenant_id": tenant_id, "name": f"{tenant_id} inc."}
        if quotas:
            body["quotas"] = quotas
        r = self.client.post("/v1/tenants", json=body, headers=ADMIN)
        assert r.status_code == 201, r.text
        r = self.client.post(f"/v1/tenants/{tenant_id}/keys", json={"name": "test"}, headers=ADMIN)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['api_key']}"}

    def upload(self, headers: dict[str, str], data: bytes, avatar_id: str | None = None) -> Any:
        form = {"avatar_id": avatar_id} if avatar_id else {}
        return self.client.post(
            "/v1/avatars", files={"portrait": ("p.png", data, "image/png")}, data=form, headers=headers
        )


def make_app(redis_url: str, prefix: str, model: Any, livekit: LiveKitSettings | None = LIVEKIT):
    settings = gateway_settings(redis_url, prefix, livekit)
    store = SessionStore.from_settings(settings.service)
    return create_app(settings, store=store, encoder=InProcessEncoder(store, model)), settings


@pytest.fixture()
def api(redis_url: str, prefix: str, tiny_model) -> Iterator[Api]:
    app, settings = make_app(redis_url, prefix, tiny_model)
    with TestClient(app) as client:
        yield Api(client, settings)
