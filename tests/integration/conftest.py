"""Fixtures of the integration tests (real Redis)."""

from tests.redis_support import prefix, redis_url

__all__ = ["prefix", "redis_url"]
