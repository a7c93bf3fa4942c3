"""The gateway in front of the real Serve stack (local Ray, Serve's gRPC proxy, tiny model, real Redis):
create a tenant -> an API key -> upload the sample portrait (encoded by the MotionEncoder deployment
through the proxy) -> create a session -> stream the sample inputs through gRPC with the session
token -> frames back; then the session's figures, stop, and a revoked key failing at once.

One stack for the module (it takes a minute or two to start on 2 cores)."""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid

import httpx
import pytest

from services.client import AvatarClient
from services.wire.errors import ServiceError

pytestmark = pytest.mark.integration
ADMIN_TOKEN = "stack-admin-" + secrets.token_hex(24)
FRAMES = 40  # 4 blocks of 10


@pytest.fixture(scope="module")
def stack():
    import ray

    from services.local.launcher import start_local
    from services.store.inspection import delete_namespace

    if ray.is_initialized():
        pytest.skip("Ray is already initialised in this process")
    secret = secrets.token_hex(32)
    prefix = f"gw-{uuid.uuid4().hex[:8]}"
    # The gateway the launcher starts (`avatar-forcing serve` does the same), with our admin token.
    service = start_local(
        "tiny",
        grpc_port=0,
        http_port=0,
        auth_secret=secret,
        app_args={"redis_prefix": prefix, "degrade": True},
        start_redis_if_down=True,
        warm=False,
        gateway_port=0,
        gateway_admin_token=ADMIN_TOKEN,
        log=lambda message: None,
    )
    gateway = service.gateway
    assert gateway is not None and not gateway.admin_token_generated
    try:
        yield {"gateway": gateway.url, "target": service.grpc_target, "demo_key": gateway.demo_api_key}
    finally:
        try:
            delete_namespace(service.redis_url, prefix)
        finally:
            service.stop()


def test_tenant_key_avatar_session_stream_frames(stack):
    from services.local.warmup import sample_inputs

    inputs = sample_inputs(frames=FRAMES)
    assert inputs is not None, "the repository's samples/ are missing"
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=stack["gateway"], timeout=120) as c:
        ready = c.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert c.post("/v1/tenants", json={"tenant_id": "acme"}, headers=admin).status_code == 201
        created_key = c.post("/v1/tenants/acme/keys", json={"name": "e2e"}, headers=admin).json()
        headers = {"Authorization": f"Bearer {created_key['api_key']}"}
        portrait = inputs.portrait if isinstance(inputs.portrait, bytes) else None
        if portrait is None:
            from services.wire.images import portrait_bytes

            portrait = portrait_bytes(inputs.portrait)
        files = {"portrait": ("portrait.png", portrait, "image/png")}
        uploaded = c.post("/v1/avatars", files=files, data={"avatar_id": "ava"}, headers=headers)
        assert uploaded.status_code == 201, uploaded.text
        # A portrait without a face is refused by the MotionEncoder deployment itself (422, not stored).
        import cv2
        import numpy as np

        _, blank = cv2.imencode(".png", np.full((128, 128, 3), 127, np.uint8))
        files = {"portrait": ("blank.png", blank.tobytes(), "image/png")}
        refused = c.post("/v1/avatars", files=files, data={"avatar_id": "blank"}, headers=headers)
        assert refused.status_code == 422 and refused.json()["error"]["field"].startswith("portrait"), refused.text
        assert c.get("/v1/avatars/blank", headers=headers).status_code == 404

        created = c.post("/v1/sessions", json={"avatar_id": "ava", "options": {"warm_start": True}}, headers=headers)
        assert created.status_code == 201, created.text
        session = created.json()
        assert session["grpc_target"] == stack["target"]

        frames = asyncio.run(stream(stack["target"], session["session_token"], session["session_id"], inputs))
        assert [f.index for f in frames] == list(range(FRAMES))
        assert all(f.image.shape[2] == 3 for f in frames)

        deadline = time.monotonic() + 10
        got = c.get(f"/v1/sessions/{session['session_id']}", headers=headers)
        while got.status_code == 200 and time.monotonic() < deadline and not got.json()["figures"]:
            time.sleep(0.2)
            got = c.get(f"/v1/sessions/{session['session_id']}", headers=headers)
        # Once the stream ended the ingress closed the session (404), or its figures are there.
        assert got.status_code == 404 or got.json()["figures"].get("frames", 0) > 0, got.text

        # The session token streams only its own session.
        other = c.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers).json()
        with pytest.raises(ServiceError) as refused_stream:  # the ingress enforces the token's `sid`
            asyncio.run(stream(stack["target"], session["session_token"], other["session_id"], inputs, frames=10))
        assert refused_stream.value.code.name in ("NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED")
        assert c.delete(f"/v1/sessions/{other['session_id']}", headers=headers).status_code == 200

        # A revoked key stops working at once.
        c.delete(f"/v1/tenants/acme/keys/{created_key['key_id']}", headers=admin)
        assert c.get("/v1/sessions", headers=headers).status_code == 401


async def stream(target: str, token: str, session_id: str, inputs, frames: int = FRAMES):
    from services.wire.protos import Limit

    received = []
    client = AvatarClient(target, token)
    async with client, client.session(avatar_id="ava", session_id=session_id, options={"warm_start": True}) as s:

        async def send() -> None:
            for i in range(frames):
                stamp = i * 40_000
                audio = slice(i * Limit.SAMPLES_PER_FRAME, (i + 1) * Limit.SAMPLES_PER_FRAME)
                await s.send_avatar_audio(inputs.avatar_audio[audio], timestamp_us=stamp)
                await s.send_user_frame(inputs.user_frames[i], timestamp_us=stamp)
                await s.send_user_audio(inputs.user_audio[audio], timestamp_us=stamp)
            await s.end_input()

        sender = asyncio.create_task(send())
        async for frame in s.frames():
            received.append(frame)
        await sender
    return received


def test_the_launcher_made_a_demo_tenant_whose_key_works(stack):
    with httpx.Client(base_url=stack["gateway"], timeout=60) as c:
        listed = c.get("/v1/avatars", headers={"Authorization": f"Bearer {stack['demo_key']}"})
        assert listed.status_code == 200, listed.text
        tenants = c.get("/v1/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).json()["tenants"]
        assert "demo" in {t["tenant_id"] for t in tenants}
        assert c.get("/v1/avatars", headers={"Authorization": "Bearer afk_nope.nope"}).status_code == 401
