"""The stack the benchmark measures: `services.local.launcher.start_local` on free loopback ports
with a private Redis prefix and a fresh auth secret, and stopping it (its keys deleted through the
store's inspection). The load test (tests/integration/test_load.py) starts it the same way."""

from __future__ import annotations

import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis

from services.local.launcher import LocalService, start_local
from services.store.inspection import delete_namespace
from services.store.keys import KeySchema
from services.store.quotas import TenantQuotas

Log = Callable[[str], None]
# A benchmark measures capacity: the tenant quotas (services.store.quotas) must not be what stops it.
BENCH_QUOTAS = TenantQuotas(max_concurrent_sessions=10_000, max_session_minutes=1e8)


def log_progress(message: str) -> None:
    """Progress goes to stderr: stdout carries only the markdown report."""
    print(message, file=sys.stderr, flush=True)


def default_latency_budget_s() -> float:
    """The ingress's own default latency budget (IngressSettings.latency_budget_s)."""
    # Imported on use: the ingress pulls in torch and transformers, which `--help` does not need.
    from services.ingress.config import IngressSettings

    return IngressSettings.__dataclass_fields__["latency_budget_s"].default


@dataclass
class BenchStack:
    """A running local stack (`services.local.launcher.start_local`) with this benchmark's Redis prefix."""

    service: LocalService
    prefix: str  # every Redis key of this stack starts with it
    config: str
    degrade: bool
    latency_budget_s: float
    generator_replicas: int
    _tenants: set[str] = field(default_factory=set, repr=False)  # tenants given BENCH_QUOTAS
    _stopped: bool = field(default=False, repr=False)

    @property
    def target(self) -> str:
        return self.service.grpc_target  # Serve's gRPC proxy, 127.0.0.1:port

    @property
    def redis_url(self) -> str:
        return self.service.redis_url

    def token(self, tenant: str = "bench", ttl_s: float = 3600.0) -> str:
        """A token for `tenant`, whose quotas are first raised so that only capacity limits the run."""
        self._unlimited(tenant)
        return self.service.mint_token(tenant, ttl_s)

    def _unlimited(self, tenant: str) -> None:
        if tenant in self._tenants:
            return
        client = redis.Redis.from_url(self.redis_url)
        try:
            client.hset(KeySchema(self.prefix).tenant(tenant), mapping=BENCH_QUOTAS.to_fields())
        finally:
            client.close()
        self._tenants.add(tenant)

    def metadata(self, tenant: str = "bench") -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token(tenant)}"),)

    def stop(self) -> None:
        """Delete the prefix's keys (portraits included), then stop the service; once."""
        if self._stopped:
            return
        self._stopped = True
        try:
            with contextlib.suppress(Exception):
                delete_namespace(self.redis_url, self.prefix)
        finally:
            with stdout_to_stderr():  # Ray's shutdown chatter goes to fd 1; keep stdout for the tables
                self.service.stop()

    def __enter__(self) -> BenchStack:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr for the block (output of Ray's C++ core included)."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no fd 1 (embedded interpreters): nothing to redirect
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def start_stack(
    config: str = "tiny",
    *,
    generator_replicas: int = 1,
    degrade: bool = True,
    latency_budget_s: float | None = None,
    redis_url: str | None = None,
    prefix: str | None = None,
    num_cpus: int | None = None,
    env: dict[str, str] | None = None,
    app_args: dict[str, Any] | None = None,
    log: Log = log_progress,
) -> BenchStack:
    """`start_local` on free loopback ports with a private Redis prefix and a fresh secret; Redis is
    the URL's, else a private redis-server. `latency_budget_s` None: the ingress's default.
    `num_cpus` None: the launcher's own default, so the benchmark's Ray is the one `serve` starts
    (same CPUs, worker priority and warm-up before it is used)."""
    import ray

    if ray.is_initialized():
        raise RuntimeError("start_stack: Ray is already initialised in this process; it starts its own")
    prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}"
    budget = default_latency_budget_s() if latency_budget_s is None else latency_budget_s
    with stdout_to_stderr():
        service = start_local(
            config,
            grpc_port=0,
            http_port=0,
            redis_url=redis_url,
            num_cpus=num_cpus,
            auth_secret=secrets.token_hex(32),
            app_args={
                "redis_prefix": prefix,
                "degrade": degrade,
                "latency_budget_s": budget,
                "generator_replicas": generator_replicas,
                **(app_args or {}),
            },
            env=env,
            start_redis_if_down=True,
            log=log,
        )
    return BenchStack(service, prefix, config, degrade, budget, generator_replicas)
