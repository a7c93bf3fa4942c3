"""The launcher's own logic, without starting Ray: which Redis it uses or starts (a real
redis-server on a free port), the clear exit for an unreachable configured Redis, the Serve
options it passes, and that a failed start stops what it started."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import redis
import yaml

from services.common import auth
from services.local import launcher, ports, redis_process, serve_deploy
from services.local.errors import LauncherError
from services.local.redis_process import ensure_redis, is_default_local_url, redact_url, redis_answers

REPO = Path(__file__).resolve().parents[2]
needs_redis_server = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


def unused_port() -> int:
    return ports.free_port()


def test_default_local_urls():
    assert is_default_local_url("redis://127.0.0.1:6379/0")
    assert is_default_local_url("redis://localhost:6379/3")
    assert is_default_local_url("redis://localhost")
    assert not is_default_local_url("redis://127.0.0.1:6380/0")
    assert not is_default_local_url("redis://redis:6379/0")
    assert not is_default_local_url("rediss://127.0.0.1:6379/0")
    assert not is_default_local_url("redis://:pw@127.0.0.1:6379/0")
    assert launcher.DEFAULT_REDIS_URL == "redis://127.0.0.1:6379/0"


def test_redact_url():
    assert redact_url("redis://:hunter2@redis.internal:6380/1") == "redis://:***@redis.internal:6380/1"
    assert redact_url("rediss://app:hunter2@redis/0") == "rediss://app:***@redis/0"
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


@needs_redis_server
def test_a_redis_that_answers_is_used_as_it_is():
    server = redis_process.start_redis_server()
    try:
        assert ensure_redis(server.url, start_if_down=True) == (server.url, None)
    finally:
        server.stop()


@needs_redis_server
def test_starts_redis_when_the_default_url_does_not_answer(monkeypatch):
    port = unused_port()
    monkeypatch.setattr(redis_process, "DEFAULT_REDIS_PORT", port)  # "the default" without touching 6379
    url = f"redis://127.0.0.1:{port}/2"
    assert is_default_local_url(url) and not redis_answers(url)
    messages: list[str] = []
    used, server = ensure_redis(url, log=messages.append)
    try:
        assert server is not None and used == url  # the default port was free, so it is used
        assert "started redis-server" in messages[0]
        client = redis.Redis.from_url(used)
        client.set("k", "v")
        assert client.get("k") == b"v" and client.config_get("save")["save"] == ""  # no persistence
        assert client.config_get("appendonly")["appendonly"] == "no"
        client.close()
    finally:
        server.stop()
    assert not server.alive() and not server.data_dir.exists() and not redis_answers(url)


@needs_redis_server
def test_starts_redis_on_a_free_port_when_the_default_port_is_taken(monkeypatch):
    with socket.socket() as squatter:  # something that is not Redis holds the default port
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        squatted = f"redis://127.0.0.1:{port}/0"
        real = redis_process.redis_answers
        monkeypatch.setattr(redis_process, "DEFAULT_REDIS_PORT", port)
        monkeypatch.setattr(
            redis_process, "redis_answers", lambda url, timeout_s=1.0: url != squatted and real(url, timeout_s)
        )
        used, server = ensure_redis(squatted, log=lambda _: None)
        try:
            assert server is not None and server.port != port and used == f"redis://127.0.0.1:{server.port}/0"
            assert redis.Redis(port=server.port).ping()
        finally:
            server.stop()


def test_an_unreachable_configured_redis_is_a_clear_error():
    port = unused_port()
    with pytest.raises(LauncherError) as caught:
        ensure_redis(f"redis://:hunter2@127.0.0.1:{port}/0", log=lambda _: None)
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert f"127.0.0.1:{port}" in message and "hunter2" not in message and "***" in message


def test_serve_exits_2_for_an_unreachable_redis_without_starting_ray(capsys, monkeypatch):
    monkeypatch.setattr(launcher, "_build_app", lambda args: pytest.fail("the app must not be built"))
    url = f"redis://10.255.255.1:{unused_port()}/0"  # non-default: never replaced by a local one
    monkeypatch.setattr(redis_process, "redis_answers", lambda u, timeout_s=1.0: False)
    assert launcher.main(["--config", "tiny", "--redis-url", url]) == 2
    assert "no Redis answers at redis://10.255.255.1" in capsys.readouterr().err


def test_redis_server_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(redis_process.shutil, "which", lambda name: None)
    with pytest.raises(LauncherError, match="redis-server` is not installed") as caught:
        redis_process.start_redis_server(unused_port())
    assert caught.value.exit_code == 2


def test_bad_arguments_exit_2(capsys, tmp_path):
    assert launcher.main(["--config", "tiny", "--weights", str(tmp_path / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert launcher.main(["--config", "tiny", "--serve-config", str(tmp_path / "missing.yaml")]) == 2
    assert "file not found" in capsys.readouterr().err


def test_servicer_functions_are_the_five_services_and_match_the_serve_config():
    paths = serve_deploy.servicer_functions()
    assert len(paths) == 5 and len(set(paths)) == 5
    for path in paths:
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))
    config = yaml.safe_load((REPO / "deploy/serve/config.yaml").read_text())
    assert sorted(config["grpc_options"]["grpc_servicer_functions"]) == sorted(paths)


def test_serve_config_ports_can_be_overridden():
    pytest.importorskip("ray.serve")
    config = serve_deploy.load_serve_config(REPO / "deploy/serve/config.cpu.yaml", 9100, None)
    assert config.grpc_options.port == 9100 and config.http_options.port == 8000
    assert len(config.grpc_options.grpc_servicer_functions) == 5


@needs_redis_server
def test_a_failed_start_stops_the_redis_it_started_and_restores_the_environment(monkeypatch):
    ray = pytest.importorskip("ray")
    port = unused_port()
    monkeypatch.setattr(redis_process, "DEFAULT_REDIS_PORT", port)
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setattr(launcher, "DEFAULT_REDIS_URL", f"redis://127.0.0.1:{port}/0")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    seen = {}

    def failing_init(**kwargs):
        seen.update(kwargs, redis=redis_answers(f"redis://127.0.0.1:{port}/0"), env=os.environ["REDIS_URL"])
        raise RuntimeError("ray failed to start")

    monkeypatch.setattr(ray, "init", failing_init)
    before = os.environ.get(auth.SECRET_ENV)
    with pytest.raises(RuntimeError, match="ray failed"):
        launcher.start_local(config="tiny", num_cpus=1, log=lambda _: None)
    assert seen["redis"] and seen["env"] == f"redis://127.0.0.1:{port}/0"
    assert seen["address"] == "local" and seen["num_cpus"] == 1 and seen["include_dashboard"] is False
    assert not redis_answers(f"redis://127.0.0.1:{port}/0")  # stopped again
    assert os.environ.get(auth.SECRET_ENV) == before and "REDIS_URL" not in os.environ


def test_banner_shows_the_endpoints_and_a_dev_token_but_never_the_secret():
    secret = auth.dev_secret()
    service = launcher.LocalService(
        grpc_target="127.0.0.1:9000",
        http_url="http://127.0.0.1:8000",
        health_url="http://127.0.0.1:8000/-/healthz",
        token=auth.mint_token("dev", secret),
        redis_url="redis://:hunter2@127.0.0.1:6379/0",
        config="tiny",
        dev_secret=True,
        _secret=secret,
    )
    text = launcher.banner(service, print_token=False)
    assert "127.0.0.1:9000" in text and "http://127.0.0.1:8000/-/healthz" in text
    assert service.token in text and "DEVELOPMENT" in text
    assert secret not in text and "hunter2" not in text
    assert all(hidden not in repr(service) for hidden in (secret, service.token, "hunter2"))
    assert auth.verify_token(service.mint_token("globex"), secret) == "globex"
    production = launcher.LocalService(**{**service.__dict__, "dev_secret": False})
    assert production.token not in launcher.banner(production, print_token=False)
    assert production.token in launcher.banner(production, print_token=True)
