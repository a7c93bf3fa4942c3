"""The gateway: the control plane of the avatar service (FastAPI, OpenAPI at /openapi.json, /v1/...).

    from services.gateway import GatewaySettings, create_app, serve_gateway

Modules: settings (environment), app (create_app), deps (admin credential, API key -> tenant,
rate limit), schemas, routes/{tenants, keys, avatars, sessions, health}, encoder (EncodePortrait),
livekit (room tokens, bridge dispatch), errors (ServiceError -> HTTP), logs (JSON, no secrets),
server (uvicorn; serve_gateway for the launcher). The API: docs/gateway.md.
"""

from services.gateway.app import create_app
from services.gateway.server import GatewayHandle, serve_gateway
from services.gateway.settings import GatewaySettings, LiveKitSettings

__all__ = ["GatewayHandle", "GatewaySettings", "LiveKitSettings", "create_app", "serve_gateway"]
