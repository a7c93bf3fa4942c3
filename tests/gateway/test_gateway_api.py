"""The gateway's API on real Redis with the real MotionEncoder servicer in-process: tenants, keys,
avatars, sessions, quotas, isolation between tenants, LiveKit tokens and dispatch, errors, logs."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging

import jwt
import pytest
import redis
from fastapi.testclient import TestClient

from services.common.auth import verify_claims
from services.gateway.livekit import PUBLISH_ON_BEHALF, avatar_identity
from services.store import SessionStore
from services.store.dispatch import DISPATCH_GROUP
from tests.gateway.conftest import ADMIN, ADMIN_TOKEN, LIVEKIT, SECRET, make_app

pytestmark = pytest.mark.integration


def keys_of(redis_url: str, prefix: str) -> set[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        return {k.decode() for k in client.scan_iter(f"{prefix}:*")}
    finally:
        client.close()


def dispatch_orders(redis_url: str, prefix: str) -> list[tuple[str, dict]]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries = client.xrange(f"{prefix}:bridge:dispatch")
        return [(f[b"action"].decode(), json.loads(f[b"order"])) for _, f in entries]
    finally:
        client.close()


# -- tenants and keys --------------------------------------------------------------------------------


def test_tenant_lifecycle_and_admin_credential(api):
    c = api.client
    assert c.post("/v1/tenants", json={"tenant_id": "acme"}).status_code == 401
    assert (
        c.post("/v1/tenants", json={"tenant_id": "acme"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    r = c.post("/v1/tenants", json={"tenant_id": "acme", "name": "Acme", "quotas": {"requests_per_minute": 50}},
               headers=ADMIN)  # fmt: skip
    assert r.status_code == 201 and r.json()["quotas"]["requests_per_minute"] == 50
    assert r.json()["quotas"]["max_concurrent_sessions"] == 4  # the default
    again = c.post("/v1/tenants", json={"tenant_id": "acme"}, headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"
    assert [t["tenant_id"] for t in c.get("/v1/tenants", headers=ADMIN).json()["tenants"]] == ["acme"]
    r = c.patch("/v1/tenants/acme", json={"quotas": {"max_concurrent_sessions": 9}}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["quotas"] == {
        "max_concurrent_sessions": 9, "max_session_minutes": 600.0, "max_portrait_bytes": 1 << 20,
        "requests_per_minute": 50}  # fmt: skip
    got = c.get("/v1/tenants/acme", headers=ADMIN).json()
    assert got["usage"]["active_sessions"] == 0 and got["name"] == "Acme"
    bad = c.patch("/v1/tenants/acme", json={"quotas": {"requests_per_minute": 0}}, headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "quotas.requests_per_minute"
    assert c.get("/v1/tenants/nobody", headers=ADMIN).status_code == 404
    assert c.get("/v1/tenants/bad id!", headers=ADMIN).status_code == 422
    assert c.delete("/v1/tenants/acme", headers=ADMIN).status_code == 204
    assert c.get("/v1/tenants/acme", headers=ADMIN).status_code == 404


def test_api_key_is_shown_once_stored_as_a_hash_and_revocation_is_immediate(api, redis_url, prefix):
    c = api.client
    c.post("/v1/tenants", json={"tenant_id": "acme"}, headers=ADMIN)
    created = c.post("/v1/tenants/acme/keys", json={"name": "ci"}, headers=ADMIN).json()
    key, key_id = created["api_key"], created["key_id"]
    secret = key.split(".", 1)[1]
    assert created["last_used_ms"] is None and created["revoked_ms"] is None
    record = redis.Redis.from_url(redis_url).hgetall(f"{prefix}:apikey:{key_id}")
    assert record[b"sha256"].decode() == hashlib.sha256(secret.encode()).hexdigest()
    assert not any(secret.encode() in v for v in record.values())  # only the digest is stored
    listed = c.get("/v1/tenants/acme/keys", headers=ADMIN).json()["keys"]
    assert [k["key_id"] for k in listed] == [key_id] and "api_key" not in listed[0]

    headers = {"Authorization": f"Bearer {key}"}
    assert c.get("/v1/avatars", headers=headers).status_code == 200
    assert c.get(f"/v1/tenants/acme/keys/{key_id}", headers=ADMIN).json()["last_used_ms"] is not None
    wrong = {"Authorization": f"Bearer {key[:-1]}{'A' if key[-1] != 'A' else 'B'}"}
    assert c.get("/v1/avatars", headers=wrong).status_code == 401
    assert c.get("/v1/avatars", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}).status_code == 401
    assert c.get("/v1/tenants", headers=headers).status_code == 401  # a tenant key is no admin credential

    revoked = c.delete(f"/v1/tenants/acme/keys/{key_id}", headers=ADMIN)
    assert revoked.status_code == 200 and revoked.json()["revoked_ms"] is not None
    r = c.get("/v1/avatars", headers=headers)
    assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer"
    assert c.delete("/v1/tenants/other/keys/" + key_id, headers=ADMIN).status_code == 404


def test_revoked_key_fails_at_once_on_every_replica(redis_url, prefix, tiny_model):
    app_a, _ = make_app(redis_url, prefix, tiny_model)
    app_b, _ = make_app(redis_url, prefix, tiny_model)
    with TestClient(app_a) as a, TestClient(app_b) as b:
        a.post("/v1/tenants", json={"tenant_id": "acme"}, headers=ADMIN)
        created = a.post("/v1/tenants/acme/keys", json={}, headers=ADMIN).json()
        headers = {"Authorization": f"Bearer {created['api_key']}"}
        assert b.get("/v1/sessions", headers=headers).status_code == 200
        a.delete(f"/v1/tenants/acme/keys/{created['key_id']}", headers=ADMIN)
        assert b.get("/v1/sessions", headers=headers).status_code == 401


# -- avatars -----------------------------------------------------------------------------------------


def test_avatar_upload_list_get_delete_and_invalidation(api, portrait, redis_url, prefix):
    headers = api.tenant("acme")
    r = api.upload(headers, portrait, "ava")
    assert r.status_code == 201, r.text
    info = r.json()
    assert info["avatar_id"] == "ava" and info["format"] == "PNG" and info["bytes"] == len(portrait)
    assert info["sha256"] == hashlib.sha256(portrait).hexdigest()
    derived = api.upload(headers, portrait)  # no id: derived from the bytes, stable
    assert derived.status_code == 201 and derived.json()["avatar_id"].startswith("av_")
    assert sorted(a["avatar_id"] for a in api.client.get("/v1/avatars", headers=headers).json()["avatars"]) == sorted(
        ["ava", derived.json()["avatar_id"]]
    )
    assert api.client.get("/v1/avatars/ava", headers=headers).json() == info

    async def deleted_events() -> list[tuple[str, str]]:
        store = SessionStore(redis_url, prefix)
        subscribed, seen = asyncio.Event(), []

        async def listen():
            async for event in store.avatar_invalidations(subscribed):
                seen.append(event)
                return

        task = asyncio.create_task(listen())
        await subscribed.wait()
        await asyncio.to_thread(api.client.delete, "/v1/avatars/ava", headers=headers)
        await asyncio.wait_for(task, 10)
        await store.aclose()
        return seen

    assert asyncio.run(deleted_events()) == [("acme", "ava")]
    assert api.client.get("/v1/avatars/ava", headers=headers).status_code == 404
    assert api.client.delete("/v1/avatars/ava", headers=headers).status_code == 404
    assert f"{prefix}:tenant:acme:avatar:ava" not in keys_of(redis_url, prefix)


def test_portrait_validation_size_and_format_limits(api, portrait):
    size = len(portrait)
    at_limit = api.tenant("exact", max_portrait_bytes=size)
    assert api.upload(at_limit, portrait, "ok").status_code == 201
    over = api.tenant("under", max_portrait_bytes=size - 1)
    r = api.upload(over, portrait, "big")
    assert r.status_code == 429 and r.json()["error"]["limit"] == "max_portrait_bytes"
    gif = api.upload(at_limit, b"GIF89a" + bytes(100), "gif")
    assert gif.status_code == 415 and gif.json()["error"]["field"] == "portrait"
    empty = api.upload(at_limit, b"", "empty")
    assert empty.status_code == 422 and empty.json()["error"]["field"] == "portrait"
    truncated = api.upload(at_limit, portrait[:200], "trunc")
    assert truncated.status_code == 422 and truncated.json()["error"]["field"].startswith("portrait")
    import cv2
    import numpy as np

    _, blank = cv2.imencode(".png", np.full((128, 128, 3), 127, np.uint8))
    no_face = api.upload(at_limit, blank.tobytes(), "blank")
    assert no_face.status_code == 422 and "face" in no_face.json()["error"]["message"]
    assert api.upload(at_limit, portrait, "bad id!").status_code == 422
    huge = api.client.post("/v1/avatars", content=b"x" * (3 << 20), headers=at_limit | {"content-type": "image/png"})
    assert huge.status_code == 413
    # Only the good upload was stored.
    assert [a["avatar_id"] for a in api.client.get("/v1/avatars", headers=at_limit).json()["avatars"]] == ["ok"]


# -- sessions ----------------------------------------------------------------------------------------


def test_session_create_get_list_stop(api, portrait):
    headers = api.tenant("acme")
    api.upload(headers, portrait, "ava")
    r = api.client.post("/v1/sessions", json={"avatar_id": "ava", "options": {"block": 5, "seed": 3}}, headers=headers)
    assert r.status_code == 201, r.text
    s = r.json()
    assert s["status"] == "pending" and s["options"] == {"block": 5, "seed": 3} and s["livekit"] is None
    claims = verify_claims(s["session_token"], SECRET)
    assert claims.tenant_id == "acme" and claims.session_id == s["session_id"]
    assert 0 < claims.expires_at * 1000 - s["token_expires_ms"] + 1000 <= 2000
    got = api.client.get(f"/v1/sessions/{s['session_id']}", headers=headers).json()
    assert got["status"] == "pending" and got["figures"] == {} and got["avatar_id"] == "ava"
    assert [x["session_id"] for x in api.client.get("/v1/sessions", headers=headers).json()["sessions"]] == [
        s["session_id"]
    ]
    stopped = api.client.delete(f"/v1/sessions/{s['session_id']}", headers=headers)
    assert stopped.json() == {"session_id": s["session_id"], "status": "closed"}
    assert api.client.get(f"/v1/sessions/{s['session_id']}", headers=headers).status_code == 404
    missing = api.client.post("/v1/sessions", json={"avatar_id": "nope"}, headers=headers)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    bad = api.client.post("/v1/sessions", json={"avatar_id": "ava", "options": {"nfe": 1}}, headers=headers)
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "options.nfe"


def test_active_session_stop_requests_stopping(api, portrait, redis_url, prefix):
    headers = api.tenant("acme")
    api.upload(headers, portrait, "ava")
    sid = api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers).json()["session_id"]

    async def activate():
        async with SessionStore(redis_url, prefix) as store:
            await store.heartbeat(sid, "acme", status="active")
            await store.set_figures(sid, "acme", {"frames": 40, "block_latency_p50_ms": 310.5})

    asyncio.run(activate())
    got = api.client.get(f"/v1/sessions/{sid}", headers=headers).json()
    assert got["status"] == "active" and got["figures"] == {"frames": 40.0, "block_latency_p50_ms": 310.5}
    r = api.client.delete(f"/v1/sessions/{sid}", headers=headers)
    assert r.json()["status"] == "stopping"
    assert api.client.get(f"/v1/sessions/{sid}", headers=headers).json()["status"] == "stopping"


def test_concurrent_session_quota_edge(api, portrait):
    headers = api.tenant("acme", max_concurrent_sessions=2)
    api.upload(headers, portrait, "ava")
    first = [api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers) for _ in range(2)]
    assert [r.status_code for r in first] == [201, 201]  # at the limit: passes
    over = api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers)
    assert over.status_code == 429 and over.json()["error"]["limit"] == "max_concurrent_sessions"
    assert "max_concurrent_sessions" in over.json()["error"]["message"]
    api.client.delete(f"/v1/sessions/{first[0].json()['session_id']}", headers=headers)
    assert api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers).status_code == 201


def test_session_minutes_quota_edge(api, portrait, redis_url, prefix):
    headers = api.tenant("acme", max_session_minutes=1.0)
    api.upload(headers, portrait, "ava")

    async def use(seconds: float) -> None:
        async with SessionStore(redis_url, prefix) as store:
            await store.add_session_seconds("acme", seconds)

    asyncio.run(use(59.5))
    under = api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers)
    assert under.status_code == 201
    api.client.delete(f"/v1/sessions/{under.json()['session_id']}", headers=headers)
    asyncio.run(use(0.5))  # exactly the limit used: no more sessions this month
    over = api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers)
    assert over.status_code == 429 and over.json()["error"]["limit"] == "max_session_minutes"
    assert int(over.headers["Retry-After"]) >= 1
    assert api.client.get("/v1/usage", headers=headers).json()["session_minutes"] == pytest.approx(1.0)


def test_rate_limit_per_key_is_exact_across_replicas(redis_url, prefix, tiny_model):
    app_a, _ = make_app(redis_url, prefix, tiny_model)
    app_b, _ = make_app(redis_url, prefix, tiny_model)
    with TestClient(app_a) as a, TestClient(app_b) as b:
        a.post("/v1/tenants", json={"tenant_id": "acme", "quotas": {"requests_per_minute": 6}}, headers=ADMIN)
        key = a.post("/v1/tenants/acme/keys", json={}, headers=ADMIN).json()["api_key"]
        other = a.post("/v1/tenants/acme/keys", json={}, headers=ADMIN).json()["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        statuses, reset = [], None
        for i in range(6):  # alternating replicas; the window may roll over once between two requests
            r = (a if i % 2 else b).get("/v1/sessions", headers=headers)
            statuses.append(r.status_code)
            reset = float(r.headers["X-RateLimit-Reset"])
        if statuses != [200] * 6 or reset < 1.0:
            pytest.skip("the rate window rolled over during the test; rerun")
        over = a.get("/v1/sessions", headers=headers)
        assert over.status_code == 429 and over.json()["error"]["limit"] == "requests_per_minute"
        assert 1 <= int(over.headers["Retry-After"]) <= 60
        assert b.get("/v1/sessions", headers=headers).status_code == 429
        assert b.get("/v1/sessions", headers={"Authorization": f"Bearer {other}"}).status_code == 200  # per key


# -- isolation: another tenant's ids answer 404 on every endpoint -------------------------------------


def test_cross_tenant_attempts_answer_404_on_every_endpoint(api, portrait):
    acme = api.tenant("acme")
    globex = api.tenant("globex")
    api.upload(acme, portrait, "ava")
    sid = api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=acme).json()["session_id"]
    c = api.client
    attempts = {
        "get avatar": c.get("/v1/avatars/ava", headers=globex),
        "delete avatar": c.delete("/v1/avatars/ava", headers=globex),
        "session on avatar": c.post("/v1/sessions", json={"avatar_id": "ava"}, headers=globex),
        "get session": c.get(f"/v1/sessions/{sid}", headers=globex),
        "stop session": c.delete(f"/v1/sessions/{sid}", headers=globex),
    }
    unknown = {
        "get avatar": c.get("/v1/avatars/zzz", headers=globex),
        "get session": c.get("/v1/sessions/ses_zzz", headers=globex),
    }
    for name, r in attempts.items():
        assert r.status_code == 404, (name, r.status_code, r.text)
        assert "acme" not in r.text, name
    # The answer is the one for an unknown id (the message differs only by the id itself).
    for name, r in unknown.items():
        assert r.json()["error"]["code"] == attempts[name].json()["error"]["code"] == "not_found"
    # Lists show only the caller's own.
    assert c.get("/v1/avatars", headers=globex).json()["avatars"] == []
    assert c.get("/v1/sessions", headers=globex).json()["sessions"] == []
    assert c.get("/v1/usage", headers=globex).json()["active_sessions"] == 0
    # Upload under the same avatar id: globex gets its own avatar; acme's is untouched.
    assert api.upload(globex, portrait, "ava").status_code == 201
    assert c.get("/v1/avatars/ava", headers=acme).status_code == 200
    # And acme's resources are all still there.
    assert c.get(f"/v1/sessions/{sid}", headers=acme).json()["status"] == "pending"


# -- LiveKit -----------------------------------------------------------------------------------------


def test_livekit_session_dispatches_a_bridge_with_a_least_grant_token(api, portrait, redis_url, prefix):
    headers = api.tenant("acme")
    api.upload(headers, portrait, "ava")
    body = {"avatar_id": "ava", "room": "call-1", "agent_identity": "agent-7", "options": {"warm_start": True}}
    r = api.client.post("/v1/sessions", json=body, headers=headers)
    assert r.status_code == 201, r.text
    s = r.json()
    sid = s["session_id"]
    assert s["livekit"]["avatar_identity"] == avatar_identity(sid) and s["livekit"]["room"] == "call-1"
    [(action, order)] = dispatch_orders(redis_url, prefix)
    assert action == "join" and order["session_id"] == sid and order["tenant_id"] == "acme"
    assert order["session_token"] == s["session_token"] and order["room"] == "call-1"
    assert order["options"] == {"warm_start": True} and order["livekit_url"] == LIVEKIT.url
    claims = jwt.decode(order["bridge_token"], LIVEKIT.api_secret, algorithms=["HS256"], options={"verify_aud": False})
    assert claims["sub"] == avatar_identity(sid) and claims["iss"] == LIVEKIT.api_key
    assert claims["kind"] == "agent" and claims["attributes"] == {PUBLISH_ON_BEHALF: "agent-7"}
    video = claims["video"]
    assert video["roomJoin"] is True and video["room"] == "call-1"
    assert video["canPublish"] and video["canSubscribe"] and video["canPublishData"]
    assert sorted(video["canPublishSources"]) == ["camera", "microphone"]
    for grant in ("roomCreate", "roomList", "roomAdmin", "roomRecord", "ingressAdmin", "agent", "hidden"):
        assert not video.get(grant), grant
    assert "sip" not in claims or not claims["sip"]
    # A consumer group is there for the bridges, from the stream's start.
    client = redis.Redis.from_url(redis_url)
    groups = client.xinfo_groups(f"{prefix}:bridge:dispatch")
    assert [g["name"].decode() for g in groups] == [DISPATCH_GROUP]

    stopped = api.client.delete(f"/v1/sessions/{sid}", headers=headers)
    assert stopped.status_code == 200
    actions = dispatch_orders(redis_url, prefix)
    assert [a for a, _ in actions] == ["join", "leave"]
    assert actions[1][1]["session_id"] == sid and actions[1][1]["avatar_identity"] == avatar_identity(sid)


def test_no_livekit_no_dispatch(redis_url, prefix, tiny_model, portrait):
    app, _ = make_app(redis_url, prefix, tiny_model, livekit=None)
    with TestClient(app) as c:
        c.post("/v1/tenants", json={"tenant_id": "acme"}, headers=ADMIN)
        key = c.post("/v1/tenants/acme/keys", json={}, headers=ADMIN).json()["api_key"]
        headers = {"Authorization": f"Bearer {key}"}
        c.post("/v1/avatars", files={"portrait": ("p.png", portrait, "image/png")}, data={"avatar_id": "a"},
               headers=headers)  # fmt: skip
        r = c.post("/v1/sessions", json={"avatar_id": "a", "room": "call-1"}, headers=headers)
        assert r.status_code == 201 and r.json()["livekit"] is None and r.json()["room"] == "call-1"
    assert dispatch_orders(redis_url, prefix) == []


# -- health, tenant deletion, logs ---------------------------------------------------------------------


def test_health_and_readiness(api):
    assert api.client.get("/healthz").json() == {"status": "ok", "checks": {}}
    r = api.client.get("/readyz")  # in-process encoder: Serve is not needed, Redis answers
    assert r.status_code == 200 and r.json()["checks"] == {"redis": "ok", "serve": "ok"}


def test_readiness_fails_without_serve_or_redis(redis_url, prefix):
    from services.common.config import Settings
    from services.gateway import create_app
    from tests.gateway.conftest import gateway_settings

    settings = gateway_settings(redis_url, prefix)
    with TestClient(create_app(settings)) as c:  # ServeEncoder to 127.0.0.1:1: nothing there
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["redis"] == "ok" and r.json()["checks"]["serve"] != "ok"
    down = settings.replace(service=Settings(redis_url="redis://127.0.0.1:1/0", redis_prefix=prefix,
                                             redis_timeout_s=0.5))  # fmt: skip
    with TestClient(create_app(down)) as c:
        assert c.get("/readyz").json()["checks"]["redis"] != "ok"
        r = c.get("/v1/tenants", headers=ADMIN)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and r.headers["Retry-After"]


def test_deleting_a_tenant_leaves_nothing_behind(api, portrait, redis_url, prefix):
    before = keys_of(redis_url, prefix)
    headers = api.tenant("acme")
    api.upload(headers, portrait, "ava")
    api.client.post("/v1/sessions", json={"avatar_id": "ava", "room": "r"}, headers=headers)
    api.client.post("/v1/sessions", json={"avatar_id": "ava"}, headers=headers)
    assert api.client.delete("/v1/tenants/acme", headers=ADMIN).status_code == 204
    left = keys_of(redis_url, prefix) - before
    assert left == {f"{prefix}:bridge:dispatch"}, left  # only the dispatch stream (join + leave orders)
    assert [a for a, _ in dispatch_orders(redis_url, prefix)] == ["join", "leave"]
    assert api.client.get("/v1/avatars", headers=headers).status_code == 401


def test_logs_carry_ids_and_no_secrets(api, portrait, caplog):
    from services.gateway.logs import JsonFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    gateway_log = logging.getLogger("services.gateway")
    gateway_log.addHandler(handler)
    gateway_log.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.DEBUG):
            headers = api.tenant("acme")
            api_key = headers["Authorization"].split()[1]
            api.upload(headers, portrait, "ava")
            s = api.client.post("/v1/sessions", json={"avatar_id": "ava", "room": "r1", "agent_identity": "ag"},
                                headers=headers).json()  # fmt: skip
            api.client.get(f"/v1/sessions/{s['session_id']}", headers=headers)
            api.client.get("/v1/avatars", headers={"Authorization": "Bearer afk_k0000000000000000.not-a-real-secret"})
            api.client.delete(f"/v1/sessions/{s['session_id']}", headers=headers)
    finally:
        gateway_log.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    everything = stream.getvalue() + "\n".join(r.getMessage() + str(r.__dict__) for r in caplog.records)
    secrets = [api_key, api_key.split(".", 1)[1], ADMIN_TOKEN, s["session_token"], SECRET, LIVEKIT.api_secret]
    secrets += [s["session_token"].split(".")[2]]
    for secret in secrets:
        assert secret not in everything
    assert "not-a-real-secret" not in everything
    requests = [line for line in lines if line.get("event") == "http.request"]
    create = next(r for r in requests if r["route"] == "/v1/sessions" and r["method"] == "POST")
    assert create["tenant_id"] == "acme" and create["session_id"] == s["session_id"] and create["status"] == 201
    get = next(r for r in requests if r["route"] == "/v1/sessions/{session_id}" and r["method"] == "GET")
    assert get["session_id"] == s["session_id"] and get["key_id"].startswith("k")
    assert any(line.get("event") == "session.create" and line.get("tenant_id") == "acme" for line in lines)
    assert any(r["status"] == 401 for r in requests)


def test_openapi_is_published_with_versioned_paths(api):
    spec = api.client.get("/openapi.json").json()
    paths = set(spec["paths"])
    assert {"/v1/tenants", "/v1/tenants/{tenant_id}/keys/{key_id}", "/v1/avatars", "/v1/sessions/{session_id}"} <= paths
    assert all(p.startswith("/v1/") or p in ("/healthz", "/readyz") for p in paths)
    assert set(spec["components"]["securitySchemes"]) == {"AdminToken", "ApiKey"}
