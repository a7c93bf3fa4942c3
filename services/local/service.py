"""The running local service: `LocalService` (its endpoints, a dev token, minting others) and how
it stops everything `start_local` started - Serve and the local Ray, the private Redis, the
environment variables set for the replicas."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common import auth
from services.local.gateway import LocalGateway
from services.local.redis_process import LocalRedis, redact_url


@dataclass
class LocalService:
    """The running local service. `stop()` (or leaving a `with` block) shuts everything down."""

    grpc_target: str  # e.g. 127.0.0.1:9000
    http_url: str  # e.g. http://127.0.0.1:8000
    health_url: str  # Serve's health route on the HTTP proxy
    token: str  # a token for the tenant `dev` (a credential: kept out of repr)
    redis_url: str
    config: str
    dev_secret: bool  # True: signed with this run's development secret
    _secret: str = field(repr=False)
    weights: str = "random"  # what the replicas load: "demo model", a folder, or "random"
    _redis: LocalRedis | None = field(default=None, repr=False)
    _own_ray: bool = field(default=False, repr=False)
    _restore_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    _gateway: LocalGateway | None = field(default=None, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def __repr__(self) -> str:  # no token, no secret, no Redis password
        return (
            f"LocalService(grpc_target={self.grpc_target!r}, health_url={self.health_url!r}, "
            f"redis_url={redact_url(self.redis_url)!r}, config={self.config!r}, dev_secret={self.dev_secret})"
        )

    @property
    def gateway(self) -> LocalGateway | None:
        """The gateway started beside Serve (`start_local(gateway_port=...)`), else None."""
        return self._gateway

    @property
    def started_redis(self) -> bool:
        return self._redis is not None

    def redis_alive(self) -> bool:
        return self._redis is None or self._redis.alive()

    def mint_token(self, tenant_id: str, ttl_s: float = auth.DEFAULT_TTL_S, *, scope: str | None = None) -> str:
        """A token for any tenant, signed with this service's secret (tests, demos)."""
        return auth.mint_token(tenant_id, self._secret, ttl_s, scope=scope)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._gateway is not None:
            with contextlib.suppress(Exception):
                self._gateway.stop()
        shutdown(self._own_ray, self._redis, self._restore_env)

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def shutdown(own_ray: bool, redis_server: LocalRedis | None, restore_env: dict[str, str | None]) -> None:
    """Stop Serve and Ray (only when this process started Ray), then the Redis it started; the
    environment is put back even when stopping Ray fails."""
    try:
        if own_ray:
            import ray
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        if redis_server is not None:
            redis_server.stop()
        for name, value in restore_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def set_env(values: Mapping[str, str]) -> dict[str, str | None]:
    """Set environment variables (inherited by the Ray processes started next); returns the old values."""
    previous = {}
    for name, value in values.items():
        previous[name] = os.environ.get(name)
        os.environ[name] = value
    return previous
