"""The gateway's settings from the environment (on top of the services' `Settings`: Redis, prefix).

| variable                          | default                 | meaning                                            |
|-----------------------------------|-------------------------|----------------------------------------------------|
| AF_GATEWAY_ADMIN_TOKEN            | (required)              | the admin credential (tenants, keys); >= 32 chars  |
| AVATAR_FORCING_AUTH_SECRET        | (required)              | signs session tokens (the services verify them)    |
| AF_GATEWAY_SERVE_TARGET           | 127.0.0.1:$AF_GRPC_PORT | Serve's gRPC proxy: EncodePortrait, readiness      |
| AF_GATEWAY_PUBLIC_GRPC_TARGET     | the serve target        | the gRPC address clients are told to stream to     |
| AF_GATEWAY_SERVE_APP              | avatar-forcing          | the Serve application /readyz expects              |
| AF_GATEWAY_SESSION_TOKEN_TTL_S    | 300                     | lifetime of a session token                        |
| AF_GATEWAY_ENCODE_TIMEOUT_S       | 60                      | bound on one EncodePortrait call                   |
| AF_GATEWAY_HOST / AF_GATEWAY_PORT | 127.0.0.1 / 8080        | where `python -m services.gateway` listens         |
| LIVEKIT_URL                       | (unset: no LiveKit)     | the LiveKit server (wss://...) bridges join        |
| LIVEKIT_API_KEY / _SECRET         | (unset)                 | sign room tokens; all three or none                |
| AF_GATEWAY_LIVEKIT_TOKEN_TTL_S    | 3600                    | lifetime of a bridge's room token                  |
| AF_GATEWAY_LIVEKIT_KICK           | 1                       | stop also removes the bridge from the room (API)   |
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from services.common import auth
from services.common.config import Settings

ADMIN_TOKEN_ENV = "AF_GATEWAY_ADMIN_TOKEN"
MIN_ADMIN_TOKEN_CHARS = 32
DEFAULT_APP = "avatar-forcing"
DEFAULT_PORT = 8080  # beside Serve's HTTP proxy on 8000


@dataclass(frozen=True)
class LiveKitSettings:
    url: str
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    token_ttl_s: float = 3600.0
    kick_on_stop: bool = True


@dataclass(frozen=True)
class GatewaySettings:
    admin_token: str = field(repr=False)
    auth_secret: str = field(repr=False)
    service: Settings = field(default_factory=Settings)
    serve_target: str = "127.0.0.1:9000"
    public_grpc_target: str = ""
    serve_app: str = DEFAULT_APP
    session_token_ttl_s: float = 300.0
    encode_timeout_s: float = 60.0
    livekit: LiveKitSettings | None = None
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT

    def __post_init__(self) -> None:
        if not isinstance(self.admin_token, str) or len(self.admin_token.strip()) < MIN_ADMIN_TOKEN_CHARS:
            raise ValueError(f"{ADMIN_TOKEN_ENV}: expected at least {MIN_ADMIN_TOKEN_CHARS} characters")
        auth.check_secret(self.auth_secret)
        if not 1 <= self.session_token_ttl_s <= 24 * 3600:
            raise ValueError(f"AF_GATEWAY_SESSION_TOKEN_TTL_S: got {self.session_token_ttl_s}; expected [1, 86400]")
        if not 0 < self.encode_timeout_s <= 600:
            raise ValueError(f"AF_GATEWAY_ENCODE_TIMEOUT_S: got {self.encode_timeout_s}; expected (0, 600]")
        if not self.public_grpc_target:
            object.__setattr__(self, "public_grpc_target", self.serve_target)

    def replace(self, **changes: Any) -> GatewaySettings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> GatewaySettings:
        env = os.environ if environ is None else environ
        service = Settings.from_env(env)
        livekit = livekit_from_env(env)
        values: dict[str, Any] = {
            "admin_token": env.get(ADMIN_TOKEN_ENV, "").strip(),
            "auth_secret": auth.auth_secret(env),
            "service": service,
            "serve_target": env.get("AF_GATEWAY_SERVE_TARGET", "").strip() or f"127.0.0.1:{service.grpc_port}",
            "public_grpc_target": env.get("AF_GATEWAY_PUBLIC_GRPC_TARGET", "").strip(),
            "serve_app": env.get("AF_GATEWAY_SERVE_APP", "").strip() or DEFAULT_APP,
            "session_token_ttl_s": float(env.get("AF_GATEWAY_SESSION_TOKEN_TTL_S", "") or 300),
            "encode_timeout_s": float(env.get("AF_GATEWAY_ENCODE_TIMEOUT_S", "") or 60),
            "livekit": livekit,
            "host": env.get("AF_GATEWAY_HOST", "").strip() or "127.0.0.1",
            "port": _port(env.get("AF_GATEWAY_PORT", "")),
        }
        return cls(**(values | overrides))


def _port(text: str) -> int:
    if not text.strip():
        return DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ValueError(f"AF_GATEWAY_PORT: got {text!r}; expected a port number in [0, 65535]")
    return port


def livekit_from_env(environ: Mapping[str, str] | None = None) -> LiveKitSettings | None:
    """The LiveKit settings from LIVEKIT_URL / _API_KEY / _API_SECRET (all three or none)."""
    env = os.environ if environ is None else environ
    lk_url = env.get("LIVEKIT_URL", "").strip()
    lk_key = env.get("LIVEKIT_API_KEY", "").strip()
    lk_secret = env.get("LIVEKIT_API_SECRET", "").strip()
    livekit = None
    if lk_url or lk_key or lk_secret:
        if not (lk_url and lk_key and lk_secret):
            raise ValueError("LIVEKIT_URL, LIVEKIT_API_KEY and LIVEKIT_API_SECRET: set all three or none")
        livekit = LiveKitSettings(
            lk_url,
            lk_key,
            lk_secret,
            float(env.get("AF_GATEWAY_LIVEKIT_TOKEN_TTL_S", "3600") or 3600),
            env.get("AF_GATEWAY_LIVEKIT_KICK", "1").strip() not in ("0", "false", "no"),
        )
    return livekit
