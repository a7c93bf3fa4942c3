"""The gateway's FastAPI application: `create_app(settings)`.

    app = create_app(GatewaySettings.from_env())             # Serve's gRPC proxy encodes portraits
    app = create_app(settings, encoder=InProcessEncoder(...)) # tests, benchmarks, no Ray

Resources (the store's Redis client, the encoder's gRPC channel) are made when the app starts
(its lifespan) and closed when it stops. Every request gets a request id (`X-Request-ID`), one
structured log line (method, route, status, duration, tenant and session ids; never headers,
bodies or query strings), and bodies are capped at `MAX_BODY_BYTES` before they are read.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI

from services.gateway import logs
from services.gateway.encoder import PortraitEncoder, ServeEncoder
from services.gateway.errors import error_body, install_error_handlers
from services.gateway.livekit import BridgeDispatcher, RedisStreamDispatcher
from services.gateway.routes import avatars, health, keys, sessions, tenants
from services.gateway.schemas import ErrorBody
from services.gateway.settings import GatewaySettings
from services.gateway.state import Gateway
from services.store import SessionStore
from services.store.validation import MAX_PORTRAIT_BYTES

API_VERSION = "1.0.0"
MAX_BODY_BYTES = MAX_PORTRAIT_BYTES + 64 * 1024  # the largest portrait and its multipart framing


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 (Content-Length says so,
    or the bytes received do) without reading the rest; the app never sees it."""

    def __init__(self, app: Any, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _TooLargeError
            return message

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLargeError:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Callable) -> None:
        import json

        body = json.dumps(
            error_body("payload_too_large", f"request body over {self.limit} bytes", limit="max_request_bytes")
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLargeError(Exception):
    pass


class RequestLog:
    """ASGI middleware: a request id (X-Request-ID) and one log line per request, with the ids the
    dependencies set (same task, so their context variables are visible here afterwards)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex[:16]
        variables = (logs.request_id, logs.tenant_id, logs.session_id, logs.key_id)
        tokens = [var.set(request_id if var is logs.request_id else "") for var in variables]
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            route = scope.get("route")
            logs.log.info(
                "request",
                extra={
                    "event": "http.request",
                    "method": scope.get("method"),
                    "route": getattr(route, "path", None) or "(unmatched)",
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
            for var, token in zip(variables, tokens, strict=True):
                var.reset(token)


def create_app(
    settings: GatewaySettings,
    *,
    store: SessionStore | None = None,
    encoder: PortraitEncoder | None = None,
    dispatcher: BridgeDispatcher | None = None,
) -> FastAPI:
    """The gateway. Given parts (store, encoder, dispatcher) are used as they are, the rest are made
    from `settings` at startup; all are closed at shutdown."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        the_store = store or SessionStore.from_settings(settings.service)
        gateway = Gateway(
            settings=settings,
            store=the_store,
            encoder=encoder
            or ServeEncoder(settings.serve_target, settings.auth_secret, settings.serve_app, settings.encode_timeout_s),
            dispatcher=dispatcher or RedisStreamDispatcher(the_store, settings.livekit),
        )
        app.state.gateway = gateway
        try:
            yield
        finally:
            await gateway.aclose()

    app = FastAPI(
        title="Avatar Forcing gateway",
        version=API_VERSION,
        description="Control plane of the avatar service: tenants and API keys (admin), avatars, "
        'sessions, LiveKit dispatch, health. Errors: `{"error": {code, message, field?, limit?}}`.',
        lifespan=lifespan,
        openapi_url="/openapi.json",
        responses={
            400: {"model": ErrorBody, "description": "a body that cannot be parsed"},
            413: {"model": ErrorBody, "description": "a body over the size limit"},
            503: {"model": ErrorBody, "description": "Redis or the Serve application is unavailable"},
        },
    )
    install_error_handlers(app)
    for router in (tenants.router, keys.router, avatars.router, sessions.router, health.router):
        app.include_router(router)

    app.add_middleware(RequestLog)
    app.add_middleware(BodyLimit)
    return app
