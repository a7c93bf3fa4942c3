"""The LiveKit agent plugin (plugins/livekit, `livekit.plugins.avatar_forcing`) against the real
gateway: create_app on real Redis with the in-process MotionEncoder, served by uvicorn on loopback.

The room is a stand-in exposing what the plugin and livekit-agents' DataStreamAudioOutput touch
(name, local_participant.identity, isconnected, on/off): no LiveKit server runs here. The agent
session is livekit-agents' real AgentSession. A test against a real LiveKit server runs when
LIVEKIT_URL (and LIVEKIT_API_KEY / LIVEKIT_API_SECRET) are set.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis

pytest.importorskip("livekit.agents", reason="livekit-agents is not installed (pip install -e plugins/livekit)")

from livekit import rtc
from livekit.agents import AgentSession, APIConnectionError
from livekit.agents.job import _JobContextVar
from livekit.agents.voice.avatar import DataStreamAudioOutput
from livekit.plugins import avatar_forcing

from services.gateway import LiveKitSettings, serve_gateway
from services.gateway.encoder import InProcessEncoder
from services.gateway.livekit import avatar_identity
from services.store import SessionStore
from tests.gateway.conftest import ADMIN, gateway_settings

LIVEKIT = LiveKitSettings("ws://127.0.0.1:1", "devkey", "livekit-test-secret-" + "l" * 32, kick_on_stop=False)


@dataclass
class Gateway:
    url: str
    redis_url: str
    prefix: str

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else ADMIN
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def tenant(self, tenant_id: str, portrait: bytes, avatar_id: str = "ava", **quotas: Any) -> str:
        """A tenant with a key and one avatar; returns the key."""
        with self.client() as admin:
            body: dict[str, Any] = {"tenant_id": tenant_id, **({"quotas": quotas} if quotas else {})}
            assert admin.post("/v1/tenants", json=body).status_code == 201
            r = admin.post(f"/v1/tenants/{tenant_id}/keys", json={"name": "agent"})
            assert r.status_code == 201, r.text
            key = r.json()["api_key"]
        with self.client(key) as c:
            r = c.post(
                "/v1/avatars", files={"portrait": ("p.png", portrait, "image/png")}, data={"avatar_id": avatar_id}
            )
            assert r.status_code == 201, r.text
        return key

    def dispatch_orders(self) -> list[tuple[str, dict]]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            entries = client.xrange(f"{self.prefix}:bridge:dispatch")
            return [(f[b"action"].decode(), json.loads(f[b"order"])) for _, f in entries]
        finally:
            client.close()


def run_gateway(redis_url: str, prefix: str, model: Any, livekit: LiveKitSettings | None) -> Iterator[Gateway]:
    settings = gateway_settings(redis_url, prefix, livekit)
    store = SessionStore.from_settings(settings.service)
    with serve_gateway(settings, store=store, encoder=InProcessEncoder(store, model)) as handle:
        yield Gateway(handle.url, redis_url, prefix)


@pytest.fixture()
def gateway(redis_url: str, prefix: str, tiny_model) -> Iterator[Gateway]:
    yield from run_gateway(redis_url, prefix, tiny_model, LIVEKIT)


class FakeRoom(rtc.EventEmitter):
    """What the plugin reads of an rtc.Room: its name and the agent's identity; not connected, so
    DataStreamAudioOutput only waits for the connection (it starts nothing)."""

    def __init__(self, name: str, identity: str | None) -> None:
        super().__init__()
        self.name = name
        self._identity = identity

    @property
    def local_participant(self) -> Any:
        if self._identity is None:
            raise Exception("cannot access local participant before connecting")
        return SimpleNamespace(identity=self._identity)

    def isconnected(self) -> bool:
        return False


def plugin(gw: Gateway, key: str, **kwargs: Any) -> avatar_forcing.AvatarSession:
    return avatar_forcing.AvatarSession(avatar_id="ava", api_url=gw.url, api_key=key, **kwargs)


def test_start_creates_a_session_in_the_agents_room_and_aims_audio_at_the_avatar(gateway, portrait):
    key = gateway.tenant("acme", portrait)

    async def flow() -> avatar_forcing.AvatarSession:
        session = AgentSession()
        avatar = plugin(gateway, key, block=5, seed=3)
        await avatar.start(session, room=FakeRoom("call-1", "agent-7"))
        sid = avatar.session_id
        assert sid and avatar.avatar_identity == avatar_identity(sid) == f"af-avatar-{sid}"
        with gateway.client(key) as c:
            got = c.get(f"/v1/sessions/{sid}").json()
        assert got["room"] == "call-1" and got["avatar_id"] == "ava" and got["status"] == "pending"
        assert got["options"] == {"block": 5, "seed": 3}
        [(action, order)] = gateway.dispatch_orders()
        assert action == "join" and order["session_id"] == sid and order["room"] == "call-1"
        assert order["agent_identity"] == "agent-7" and order["avatar_identity"] == avatar.avatar_identity
        # The session's audio now goes to the bridge over data streams, at 16 kHz, once its video is up.
        audio = session.output.audio
        assert isinstance(audio, DataStreamAudioOutput) and audio is avatar.audio_output
        assert audio.sample_rate == 16000
        assert audio._destination_identity == avatar.avatar_identity
        assert audio._wait_remote_track == rtc.TrackKind.KIND_VIDEO
        await avatar.aclose()
        await avatar.aclose()  # idempotent
        return avatar

    avatar = asyncio.run(flow())
    sid = avatar.session_id
    assert avatar.stop_status == "closed"
    with gateway.client(key) as c:
        assert c.get(f"/v1/sessions/{sid}").status_code == 404
        assert c.get("/v1/usage").json()["active_sessions"] == 0
    actions = gateway.dispatch_orders()
    assert [a for a, _ in actions] == ["join", "leave"] and actions[1][1]["session_id"] == sid


def test_job_context_identity_and_shutdown_callback_stop_the_session(gateway, portrait):
    key = gateway.tenant("acme", portrait)
    callbacks: list[Any] = []
    job = SimpleNamespace(local_participant_identity="agent-from-token", add_shutdown_callback=callbacks.append)

    async def flow() -> avatar_forcing.AvatarSession:
        token = _JobContextVar.set(job)  # what the worker sets around a job's entrypoint
        try:
            avatar = plugin(gateway, key)
            # Not connected and no local participant yet: the identity comes from the job's token.
            await avatar.start(AgentSession(), room=FakeRoom("call-2", None))
            assert [cb.__self__ for cb in callbacks] == [avatar]
            for cb in callbacks:  # the job shuts down
                await cb()
            return avatar
        finally:
            _JobContextVar.reset(token)

    avatar = asyncio.run(flow())
    [(join, order), (leave, _)] = gateway.dispatch_orders()
    assert (join, leave) == ("join", "leave")
    assert order["agent_identity"] == "agent-from-token" and order["room"] == "call-2"
    assert avatar.stop_status == "closed"
    with gateway.client(key) as c:
        assert c.get("/v1/sessions").json()["sessions"] == []


def test_missing_url_or_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("AVATAR_FORCING_API_URL", raising=False)
    monkeypatch.delenv("AVATAR_FORCING_API_KEY", raising=False)
    with pytest.raises(ValueError, match="AVATAR_FORCING_API_URL"):
        avatar_forcing.AvatarSession(avatar_id="ava", api_key="afk_x.y")
    with pytest.raises(ValueError, match="AVATAR_FORCING_API_KEY"):
        avatar_forcing.AvatarSession(avatar_id="ava", api_url="http://127.0.0.1:8080")
    monkeypatch.setenv("AVATAR_FORCING_API_URL", "http://127.0.0.1:8080/v1/")
    monkeypatch.setenv("AVATAR_FORCING_API_KEY", "afk_x.y")
    assert avatar_forcing.AvatarSession(avatar_id="ava").api_url == "http://127.0.0.1:8080"


def test_no_identity_anywhere_is_a_clear_error(gateway):
    async def flow() -> None:
        await plugin(gateway, "afk_x.y").start(AgentSession(), room=FakeRoom("call-1", None))

    with pytest.raises(RuntimeError, match="agent_identity="):
        asyncio.run(flow())


def start_error(gw: Gateway, key: str, avatar_id: str = "ava", **kwargs: Any) -> BaseException:
    async def flow() -> Any:
        session = AgentSession()
        avatar = avatar_forcing.AvatarSession(avatar_id=avatar_id, api_url=gw.url, api_key=key, **kwargs)
        try:
            await avatar.start(session, room=FakeRoom("call-1", "agent-7"))
        finally:
            await avatar.aclose()
        return session.output.audio

    with pytest.raises(Exception) as info:
        asyncio.run(flow())
    return info.value


def test_bad_key_is_a_clear_error(gateway, portrait):
    key = gateway.tenant("acme", portrait)
    err = start_error(gateway, key[:-4] + "xxxx")
    assert isinstance(err, avatar_forcing.AvatarForcingError) and err.status_code == 401
    assert err.code == "unauthenticated" and not err.retryable
    assert str(err).startswith("avatar-forcing gateway answered 401 unauthenticated: ") and err.message in str(err)
    assert gateway.dispatch_orders() == []
    with FlakyProxy(gateway.url, failures=0) as proxy:  # a 4xx is not retried
        err = start_error(Gateway(proxy.url, gateway.redis_url, gateway.prefix), "afk_nope.nope", retry_interval=0.01)
    assert err.status_code == 401 and proxy.requests == [("POST", "/v1/sessions")]


def test_unknown_avatar_and_bad_options_carry_the_gateways_message(gateway, portrait):
    key = gateway.tenant("acme", portrait)
    err = start_error(gateway, key, avatar_id="nope")
    assert isinstance(err, avatar_forcing.AvatarForcingError) and err.status_code == 404 and err.code == "not_found"
    assert "nope" in str(err)
    err = start_error(gateway, key, nfe=1)
    assert err.status_code == 422 and err.field == "options.nfe" and "options.nfe" in str(err)


def test_quota_429_names_the_limit(gateway, portrait):
    key = gateway.tenant("acme", portrait, max_concurrent_sessions=1)
    with gateway.client(key) as c:
        assert c.post("/v1/sessions", json={"avatar_id": "ava"}).status_code == 201
    err = start_error(gateway, key)
    assert isinstance(err, avatar_forcing.AvatarForcingQuotaError) and err.status_code == 429
    assert err.limit == "max_concurrent_sessions" and "limit max_concurrent_sessions" in str(err)
    assert err.code == "quota_exceeded" and "max_concurrent_sessions" in err.message
    assert gateway.dispatch_orders() == []


def test_gateway_without_livekit_refuses_and_leaves_no_session(redis_url, prefix, tiny_model, portrait):
    for gw in run_gateway(redis_url, prefix, tiny_model, livekit=None):
        key = gw.tenant("acme", portrait)
        err = start_error(gw, key)
        assert isinstance(err, avatar_forcing.AvatarForcingError) and err.code == "livekit_not_configured"
        assert "LIVEKIT_URL" in str(err)
        with gw.client(key) as c:
            assert c.get("/v1/sessions").json()["sessions"] == []


class FlakyProxy:
    """Loopback HTTP in front of the gateway: the first `failures` requests answer 503 (the
    gateway's shape, Retry-After 0), the rest are forwarded. Counts what it got."""

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream, self.failures, self.requests = upstream, failures, []
        self.url = ""
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def _serve(self) -> None:
        from aiohttp import ClientSession, web

        async with ClientSession() as http:

            async def handle(request: web.Request) -> web.StreamResponse:
                self.requests.append((request.method, request.path))
                if len(self.requests) <= self.failures:
                    body = {"error": {"code": "unavailable", "message": "redis unavailable"}}
                    return web.json_response(body, status=503, headers={"Retry-After": "0"})
                headers = {"Authorization": request.headers["Authorization"], "Content-Type": "application/json"}
                async with http.request(
                    request.method, self.upstream + request.path, data=await request.read(), headers=headers
                ) as resp:
                    return web.Response(body=await resp.read(), status=resp.status, content_type="application/json")

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.url = f"http://127.0.0.1:{port}"
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            await runner.cleanup()

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


def test_5xx_is_retried_then_succeeds(gateway, portrait):
    key = gateway.tenant("acme", portrait)
    with FlakyProxy(gateway.url, failures=2) as proxy:
        gw = Gateway(proxy.url, gateway.redis_url, gateway.prefix)

        async def flow() -> avatar_forcing.AvatarSession:
            avatar = plugin(gw, key, max_retries=3, retry_interval=0.01)
            await avatar.start(AgentSession(), room=FakeRoom("call-1", "agent-7"))
            await avatar.aclose()
            return avatar

        avatar = asyncio.run(flow())
    assert proxy.requests == [("POST", "/v1/sessions")] * 3 + [("DELETE", f"/v1/sessions/{avatar.session_id}")]
    assert avatar.stop_status == "closed"
    assert [a for a, _ in gateway.dispatch_orders()] == ["join", "leave"]


def test_retries_are_bounded(gateway, portrait):
    key = gateway.tenant("acme", portrait)
    with FlakyProxy(gateway.url, failures=100) as proxy:
        err = start_error(Gateway(proxy.url, gateway.redis_url, gateway.prefix), key, max_retries=2,
                             retry_interval=0.01)  # fmt: skip
    assert isinstance(err, avatar_forcing.AvatarForcingError) and err.status_code == 503 and err.retryable
    assert "redis unavailable" in str(err)
    assert proxy.requests == [("POST", "/v1/sessions")] * 3
    assert gateway.dispatch_orders() == []
    # Nothing listening: connection errors, retried as boundedly, end in APIConnectionError.
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        err = start_error(Gateway(f"http://127.0.0.1:{port}", "", ""), key, max_retries=1, retry_interval=0.01)
    assert isinstance(err, APIConnectionError) and "2 tries" in str(err)


@pytest.mark.skipif(
    not (os.environ.get("LIVEKIT_URL") and os.environ.get("LIVEKIT_API_KEY") and os.environ.get("LIVEKIT_API_SECRET")),
    reason="needs a LiveKit server: set LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET (livekit-server --dev)",
)
def test_against_a_real_livekit_server(redis_url, prefix, tiny_model, portrait):
    """The agent joins a real room; the plugin's session is dispatched for that room and the audio
    sink waits on the connected room (the bridge itself is not run here)."""
    from livekit import api

    lk = LiveKitSettings(os.environ["LIVEKIT_URL"], os.environ["LIVEKIT_API_KEY"], os.environ["LIVEKIT_API_SECRET"])
    for gw in run_gateway(redis_url, prefix, tiny_model, lk):
        key = gw.tenant("acme", portrait)

        async def flow(gw: Gateway = gw, key: str = key) -> avatar_forcing.AvatarSession:
            room = rtc.Room()
            token = (
                api.AccessToken(lk.api_key, lk.api_secret)
                .with_kind("agent")
                .with_identity("agent-e2e")
                .with_grants(api.VideoGrants(room_join=True, room=f"plugin-e2e-{prefix}"))
                .to_jwt()
            )
            await room.connect(lk.url, token)
            try:
                avatar = plugin(gw, key)
                session = AgentSession()
                await avatar.start(session, room=room)
                assert isinstance(session.output.audio, DataStreamAudioOutput)
                await avatar.aclose()
                return avatar
            finally:
                await room.disconnect()

        avatar = asyncio.run(flow())
        [(_, order), (leave, _)] = gw.dispatch_orders()
        assert order["room"] == f"plugin-e2e-{prefix}" and order["agent_identity"] == "agent-e2e"
        assert order["livekit_url"] == lk.url and leave == "leave" and avatar.stop_status == "closed"
