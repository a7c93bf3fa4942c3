"""The Redis the launcher runs against: checking that a URL answers, and starting a private
`redis-server` (no persistence, loopback only) when the default local URL does not. Also
`redact_url`, so no message ever shows a Redis password."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from services.common.config import Settings
from services.local.errors import LauncherError, Log, print_progress
from services.local.ports import free_port, port_is_free

DEFAULT_REDIS_URL = Settings.__dataclass_fields__["redis_url"].default  # redis://127.0.0.1:6379/0
DEFAULT_REDIS_PORT = 6379
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_default_local_url(url: str) -> bool:
    """True for the default local Redis (redis://127.0.0.1:6379 or localhost, any db, no credentials):
    the only URL the launcher may replace with a Redis of its own."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        return False
    return (
        parts.scheme == "redis"
        and parts.hostname in LOCAL_HOSTS
        and port == DEFAULT_REDIS_PORT
        and parts.username is None
        and parts.password is None
    )


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at `url`. Wrong credentials are an error, not "no answer"."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:
        raise LauncherError(f"--redis-url {redact_url(url)}: {exc}", exit_code=2) from None
    try:
        return bool(client.ping())
    except redis.AuthenticationError as exc:
        raise LauncherError(f"Redis at {redact_url(url)} refused the credentials ({exc})", exit_code=2) from None
    except redis.ResponseError as exc:  # e.g. NOAUTH: it answers, but wants a password
        raise LauncherError(f"Redis at {redact_url(url)} answered with an error: {exc}", exit_code=2) from None
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the launcher dies, even by SIGKILL (no orphaned Redis)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalRedis:
    """A redis-server this process started: no persistence, bound to 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    url: str
    data_dir: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_redis_server(port: int | None = None, *, db: int = 0, timeout_s: float = 10.0) -> LocalRedis:
    """Start `redis-server` on 127.0.0.1:`port` (None: a free port) and wait until it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LauncherError(
            "no Redis answers and `redis-server` is not installed; install Redis "
            "(e.g. `apt-get install redis-server`) or pass --redis-url",
            exit_code=2,
        )
    port = free_port() if port is None else port
    data_dir = Path(tempfile.mkdtemp(prefix="avatar-forcing-redis-"))
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no"]
    log_path = data_dir / "redis.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher, which stops it in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    server = LocalRedis(process, port, f"redis://127.0.0.1:{port}/{db}", data_dir)
    deadline = time.monotonic() + timeout_s
    while not redis_answers(server.url, timeout_s=0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            server.stop()
            raise LauncherError(f"redis-server on port {port} did not start:\n{log}")
        time.sleep(0.05)
    return server


def ensure_redis(
    url: str, *, start_if_down: bool | None = None, log: Log = print_progress
) -> tuple[str, LocalRedis | None]:
    """(the Redis URL to use, the LocalRedis started for it or None).

    A Redis answering at `url` is used as it is. Otherwise, when `start_if_down` (default: `url`
    is the default local URL), a redis-server is started on the URL's port if it is free, else on
    a free port; when not, LauncherError (exit status 2).
    """
    if redis_answers(url):
        return url, None
    if start_if_down is None:
        start_if_down = is_default_local_url(url)
    if not start_if_down:
        raise LauncherError(
            f"no Redis answers at {redact_url(url)} (from --redis-url or $REDIS_URL); start it, fix the URL, "
            f"or leave both unset to let the launcher start a local Redis",
            exit_code=2,
        )
    parts = urllib.parse.urlsplit(url)
    db = int(parts.path.strip("/") or 0) if parts.path.strip("/").isdigit() else 0
    wanted = parts.port or DEFAULT_REDIS_PORT
    port = wanted if port_is_free(wanted) else None
    server = start_redis_server(port, db=db)
    log(f"redis: nothing answered at {redact_url(url)}; started redis-server at {server.url} (no persistence)")
    return server.url, server
