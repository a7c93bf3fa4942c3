"""Service settings from the environment, in one place.

    settings = Settings.from_env()   # reads os.environ; a bad value raises ValueError naming the variable

| variable                     | default                    | meaning                                          |
|------------------------------|----------------------------|--------------------------------------------------|
| REDIS_URL                    | redis://127.0.0.1:6379/0   | session store (redis:// or rediss://, db in path)|
| AF_REDIS_PREFIX              | af                         | prefix of every Redis key the services write     |
| AF_REDIS_TIMEOUT_S           | 2.0                        | bound on one Redis operation, connect included   |
| AF_GRPC_PORT                 | 9000                       | gRPC port (Ray Serve gRPC proxy / session ingress)|
| AF_HTTP_PORT                 | 8000                       | HTTP port (gateway, health, metrics)             |
| AF_MODEL_PRESET              | paper                      | avatar_forcing.config preset: paper or tiny      |
| AF_WEIGHTS_DIR               | (unset)                    | weights; `demo`: the demo model; unset: random |
| AF_HEARTBEAT_TTL_S           | 15                         | a session not heartbeated for this long is reaped|
| AF_REPLICA_TTL_S             | 10                         | a replica not heartbeated for this long is dead  |
| AF_REAP_INTERVAL_S           | 5                          | how often the reaper runs                        |
| AF_HISTORY_BLOCKS            | 16                         | history entries kept per session (ring)          |
| AF_MAX_SESSIONS_PER_REPLICA  | 8                          | generator sessions one replica holds             |
| AF_CACHE_BUDGET_BYTES        | 8GiB                       | cache memory per replica (e.g. 512MiB, 8GiB)     |
| AF_REPLICA_ID                | <hostname>-<pid>           | this process's replica id in the session store   |
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from avatar_forcing.config import PRESET_NAMES as PRESETS
from services.wire.ids import ID_PATTERN, is_valid_id

T = TypeVar("T")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_SIZE_UNITS |= {"KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_bytes(text: str) -> int:
    """ "8GiB" -> 8589934592, "512M" -> 512000000, "1024" -> 1024."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"expected a byte size like 1024, 512MiB or 8GiB, got {text!r}")
    unit = (match.group(2) or "").upper().removesuffix("B")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _default_replica_id() -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "af"
    redis_timeout_s: float = 2.0
    grpc_port: int = 9000
    http_port: int = 8000
    model_preset: str = "paper"
    weights_dir: Path | None = None
    heartbeat_ttl_s: float = 15.0
    replica_ttl_s: float = 10.0
    reap_interval_s: float = 5.0
    history_blocks: int = 16
    max_sessions_per_replica: int = 8
    cache_budget_bytes: int = 8 * 2**30
    replica_id: str = ""

    def __post_init__(self) -> None:
        if not self.replica_id:
            object.__setattr__(self, "replica_id", _default_replica_id())
        self.validate()

    def validate(self) -> None:
        def need(ok: bool, name: str, value: object, expected: str) -> None:
            if not ok:
                raise ValueError(f"{name}: got {value!r}; expected {expected}")

        need(self.redis_url.startswith(("redis://", "rediss://", "unix://")), "REDIS_URL", self.redis_url,
             "redis://host:port/db, rediss://... or unix://...")  # fmt: skip
        need(bool(re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", self.redis_prefix)), "AF_REDIS_PREFIX", self.redis_prefix,
             "1-32 characters of [A-Za-z0-9_.-]")  # fmt: skip
        need(0 < self.redis_timeout_s <= 60, "AF_REDIS_TIMEOUT_S", self.redis_timeout_s, "seconds in (0, 60]")
        for name, port in (("AF_GRPC_PORT", self.grpc_port), ("AF_HTTP_PORT", self.http_port)):
            need(0 < port < 65536, name, port, "a port in [1, 65535]")
        need(self.model_preset in PRESETS, "AF_MODEL_PRESET", self.model_preset, f"one of {PRESETS}")
        need(self.heartbeat_ttl_s >= 0.05, "AF_HEARTBEAT_TTL_S", self.heartbeat_ttl_s, "seconds >= 0.05")
        need(self.replica_ttl_s >= 0.05, "AF_REPLICA_TTL_S", self.replica_ttl_s, "seconds >= 0.05")
        need(self.reap_interval_s > 0, "AF_REAP_INTERVAL_S", self.reap_interval_s, "seconds > 0")
        need(1 <= self.history_blocks <= 1024, "AF_HISTORY_BLOCKS", self.history_blocks, "an integer in [1, 1024]")
        need(self.max_sessions_per_replica >= 1, "AF_MAX_SESSIONS_PER_REPLICA", self.max_sessions_per_replica,
             "an integer >= 1")  # fmt: skip
        need(self.cache_budget_bytes > 0, "AF_CACHE_BUDGET_BYTES", self.cache_budget_bytes, "a size > 0")
        need(is_valid_id(self.replica_id), "AF_REPLICA_ID", self.replica_id, ID_PATTERN)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, overrides: Mapping[str, Any] | None = None) -> Settings:
        """The settings of the environment, then `overrides` (field name -> value) on top."""
        env = os.environ if environ is None else environ

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            text = env.get(name, "").strip()
            if not text:
                return default
            try:
                return parse(text)
            except ValueError as exc:
                raise ValueError(f"{name}: cannot parse {text!r} ({exc})") from None

        d = cls.__dataclass_fields__
        settings = cls(
            redis_url=get("REDIS_URL", str, d["redis_url"].default),
            redis_prefix=get("AF_REDIS_PREFIX", str, d["redis_prefix"].default),
            redis_timeout_s=get("AF_REDIS_TIMEOUT_S", float, d["redis_timeout_s"].default),
            grpc_port=get("AF_GRPC_PORT", int, d["grpc_port"].default),
            http_port=get("AF_HTTP_PORT", int, d["http_port"].default),
            model_preset=get("AF_MODEL_PRESET", str, d["model_preset"].default),
            weights_dir=get("AF_WEIGHTS_DIR", Path, None),
            heartbeat_ttl_s=get("AF_HEARTBEAT_TTL_S", float, d["heartbeat_ttl_s"].default),
            replica_ttl_s=get("AF_REPLICA_TTL_S", float, d["replica_ttl_s"].default),
            reap_interval_s=get("AF_REAP_INTERVAL_S", float, d["reap_interval_s"].default),
            history_blocks=get("AF_HISTORY_BLOCKS", int, d["history_blocks"].default),
            max_sessions_per_replica=get("AF_MAX_SESSIONS_PER_REPLICA", int, d["max_sessions_per_replica"].default),
            cache_budget_bytes=get("AF_CACHE_BUDGET_BYTES", parse_bytes, d["cache_budget_bytes"].default),
            replica_id=get("AF_REPLICA_ID", str, ""),
        )
        return dataclasses.replace(settings, **overrides) if overrides else settings
