"""The gateway tests' fixtures (the tiny model for the in-process MotionEncoder, the sample portrait)."""

from tests.gateway.conftest import portrait, tiny_model  # noqa: F401 (fixtures)
