"""Property-based fuzzing of every endpoint from the published OpenAPI spec (schemathesis), against
the gateway on a real uvicorn on loopback, real Redis and the real MotionEncoder servicer.

Properties, per request: no 5xx; an answer that is not a success changed no state (the Redis key
set is the same before and after, rate windows aside); no request of the fuzzed tenant ever reaches
another tenant's avatar or session. After the run: everything the successful requests created is
removed through the API, and the namespace is back to what the seeding left. The number of
requests and their outcomes are printed (and written to $AF_FUZZ_REPORT when set).
"""

from __future__ import annotations

import json
import os
import uuid
from collections import Counter

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import status_code_conformance

from services.common.config import Settings
from services.gateway import GatewaySettings, serve_gateway
from services.gateway.encoder import InProcessEncoder
from services.store import SessionStore
from tests.gateway.conftest import ADMIN, ADMIN_TOKEN, LIVEKIT, SAMPLES, SECRET

pytestmark = pytest.mark.integration
MAX_EXAMPLES = int(os.environ.get("AF_FUZZ_EXAMPLES", "15"))
OUTCOMES: Counter[str] = Counter()


def namespace(redis_url: str, prefix: str) -> set[str]:
    client = redis.Redis.from_url(redis_url)
    try:
        # Rate windows and heartbeats expire by themselves (TTL): not state a request leaves behind.
        keys = (k.decode() for k in client.scan_iter(f"{prefix}:*"))
        return {k for k in keys if ":rate:" not in k and not k.endswith(":heartbeat")}
    finally:
        client.close()


@pytest.fixture(scope="module")
def fuzz_gateway(redis_url, tiny_model):
    prefix = f"fuzz-{uuid.uuid4().hex[:10]}"
    gateway_settings = GatewaySettings(
        admin_token=ADMIN_TOKEN,
        auth_secret=SECRET,
        service=Settings(redis_url=redis_url, redis_prefix=prefix, replica_id="gateway-fuzz"),
        serve_target="127.0.0.1:1",
        livekit=LIVEKIT,
    )
    store = SessionStore.from_settings(gateway_settings.service)
    handle = serve_gateway(gateway_settings, port=0, store=store, encoder=InProcessEncoder(store, tiny_model))
    portrait = (SAMPLES / "portrait.png").read_bytes()
    keys: dict[str, str] = {}
    seeded: dict[str, dict[str, str]] = {}
    with httpx.Client(base_url=handle.url, timeout=30) as c:
        for tenant in ("fuzz", "other"):
            body = {"tenant_id": tenant, "quotas": {"requests_per_minute": 1_000_000, "max_concurrent_sessions": 1000}}
            assert c.post("/v1/tenants", json=body, headers=ADMIN).status_code == 201
            keys[tenant] = c.post(f"/v1/tenants/{tenant}/keys", json={}, headers=ADMIN).json()["api_key"]
            auth = {"Authorization": f"Bearer {keys[tenant]}"}
            files = {"portrait": ("p.png", portrait, "image/png")}
            assert (
                c.post("/v1/avatars", files=files, data={"avatar_id": f"{tenant}-ava"}, headers=auth).status_code == 201
            )
            session = c.post("/v1/sessions", json={"avatar_id": f"{tenant}-ava"}, headers=auth).json()
            seeded[tenant] = {"avatar": f"{tenant}-ava", "session": session["session_id"]}
    state = {"url": handle.url, "prefix": prefix, "redis_url": redis_url, "keys": keys, "seeded": seeded}
    state["baseline"] = namespace(redis_url, prefix)
    yield state
    handle.stop()
    client = redis.Redis.from_url(redis_url)
    doomed = list(client.scan_iter(f"{prefix}:*"))
    if doomed:
        client.delete(*doomed)
    client.close()


def auth_headers(case, state) -> dict[str, str]:
    if case.path.startswith("/v1/tenants"):
        return dict(ADMIN)
    return {"Authorization": f"Bearer {state['keys']['fuzz']}"}


def check_one(case, state) -> None:
    before = namespace(state["redis_url"], state["prefix"])
    response = case.call(base_url=state["url"], headers=auth_headers(case, state))
    OUTCOMES[f"{case.method} {case.path} {response.status_code}"] += 1
    OUTCOMES["total"] += 1
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    case.validate_response(response, checks=[status_code_conformance])
    if response.status_code >= 300:
        assert namespace(state["redis_url"], state["prefix"]) == before, (case.method, case.path, response.text)
    if not case.path.startswith("/v1/tenants"):  # tenant routes: nothing of the other tenant comes back
        sent = json.dumps([case.path_parameters, case.query, case.body], default=str)
        for ident in (*state["seeded"]["other"].values(), "'other'", '"other"'):
            assert ident in sent or ident not in response.text, (case.method, case.path, response.text)
    return response


def test_fuzz_every_endpoint(fuzz_gateway):
    """Every operation of /openapi.json: MAX_EXAMPLES positive (schema-valid) and MAX_EXAMPLES negative
    (schema-violating) generated requests, and for the tenant routes with ids in the path MAX_EXAMPLES
    more aimed at the other tenant's avatar and session (hypothesis, derandomized)."""
    state = fuzz_gateway
    schema = schemathesis.openapi.from_url(f"{state['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20
    other = state["seeded"]["other"]
    foreign = {"avatar_id": other["avatar"], "session_id": other["session"]}
    for operation in operations:
        strategies = [operation.as_strategy(mode) for mode in GenerationMode]  # positive, negative
        names = {p.name for p in operation.path_parameters}
        if names and names <= set(foreign):
            strategies.append(operation.as_strategy(path_parameters={n: foreign[n] for n in names}))
        for strategy in strategies:

            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                suppress_health_check=list(HealthCheck),
                derandomize=True,
                database=None,
            )
            @given(case=strategy)
            def fuzz(case) -> None:
                response = check_one(case, state)
                if set(foreign.values()) & set((case.path_parameters or {}).values()):
                    assert response.status_code in (404, 401, 422), (case.method, case.path, response.text)

            try:
                fuzz()
            except Unsatisfiable:  # a negative strategy for an operation with nothing to violate (/healthz)
                OUTCOMES[f"{operation.method.upper()} {operation.path} (no negative case)"] += 0
    OUTCOMES["operations"] = len(operations)


def test_fuzzing_left_no_state_behind(fuzz_gateway):
    """Runs after the fuzzing (file order): clean up what successful requests made, via the API only."""
    state = fuzz_gateway
    assert OUTCOMES["total"] > 0, "the fuzz test did not run first"
    seeded = state["seeded"]
    with httpx.Client(base_url=state["url"], timeout=30) as c:
        for tenant in c.get("/v1/tenants", headers=ADMIN).json()["tenants"]:
            if tenant["tenant_id"] not in seeded:
                assert c.delete(f"/v1/tenants/{tenant['tenant_id']}", headers=ADMIN).status_code == 204
        auth = {"Authorization": f"Bearer {state['keys']['fuzz']}"}
        for session in c.get("/v1/sessions", headers=auth).json()["sessions"]:
            if session["session_id"] != seeded["fuzz"]["session"]:
                assert c.delete(f"/v1/sessions/{session['session_id']}", headers=auth).status_code == 200
        for avatar in c.get("/v1/avatars", headers=auth).json()["avatars"]:
            if avatar["avatar_id"] != seeded["fuzz"]["avatar"]:
                assert c.delete(f"/v1/avatars/{avatar['avatar_id']}", headers=auth).status_code == 204
        for key in c.get("/v1/tenants/fuzz/keys", headers=ADMIN).json()["keys"]:
            if key["key_id"] not in state["keys"]["fuzz"]:
                pytest.fail(f"fuzzing created key {key['key_id']} for the seeded tenant")  # would need revoking
    left = namespace(state["redis_url"], state["prefix"]) - state["baseline"]
    left.discard(f"{state['prefix']}:bridge:dispatch")  # the dispatch log (join/leave orders) is append-only
    assert left == set(), left
    calls = {k: v for k, v in sorted(OUTCOMES.items()) if k not in ("total", "operations") and "(" not in k}
    report = {"operations": OUTCOMES["operations"], "requests": OUTCOMES["total"], "outcomes": calls}
    by_status: Counter[str] = Counter()
    for k, v in calls.items():
        if True:
            by_status[k.rsplit(" ", 1)[1]] += v
    report["by_status"] = dict(sorted(by_status.items()))
    print("\nfuzz report:", json.dumps(report, indent=1))
    if os.environ.get("AF_FUZZ_REPORT"):
        with open(os.environ["AF_FUZZ_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
