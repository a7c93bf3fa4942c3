"""Service settings from the environment: defaults, parsing, and errors that name the variable."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import Settings, parse_bytes


def test_defaults():
    settings = Settings.from_env({})
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert (settings.grpc_port, settings.http_port) == (9000, 8000)
    assert settings.model_preset == "paper" and settings.weights_dir is None
    assert settings.cache_budget_bytes == 8 * 2**30
    assert settings.replica_id  # derived from the host name and pid


def test_from_env():
    settings = Settings.from_env(
        {
            "REDIS_URL": "redis://redis:6380/3",
            "AF_GRPC_PORT": "9100",
            "AF_MODEL_PRESET": "tiny",
            "AF_WEIGHTS_DIR": "/weights",
            "AF_HEARTBEAT_TTL_S": "2.5",
            "AF_HISTORY_BLOCKS": "8",
            "AF_MAX_SESSIONS_PER_REPLICA": "4",
            "AF_CACHE_BUDGET_BYTES": "512MiB",
            "AF_REPLICA_ID": "gen-0",
        }
    )
    assert settings.redis_url == "redis://redis:6380/3" and settings.grpc_port == 9100
    assert settings.model_preset == "tiny" and settings.weights_dir == Path("/weights")
    assert settings.heartbeat_ttl_s == 2.5 and settings.history_blocks == 8
    assert settings.max_sessions_per_replica == 4 and settings.cache_budget_bytes == 512 * 2**20
    assert settings.replica_id == "gen-0"


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"AF_GRPC_PORT": "ninety"}, "AF_GRPC_PORT"),
        ({"AF_GRPC_PORT": "70000"}, "AF_GRPC_PORT"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"AF_MODEL_PRESET": "huge"}, "AF_MODEL_PRESET"),
        ({"AF_CACHE_BUDGET_BYTES": "lots"}, "AF_CACHE_BUDGET_BYTES"),
        ({"AF_HISTORY_BLOCKS": "0"}, "AF_HISTORY_BLOCKS"),
        ({"AF_REPLICA_ID": "gen 0"}, "AF_REPLICA_ID"),
    ],
)
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ValueError, match=name):
        Settings.from_env(env)


def test_parse_bytes():
    assert parse_bytes("1024") == 1024
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("1.5k") == 1500
    assert parse_bytes("2 MB") == 2_000_000
