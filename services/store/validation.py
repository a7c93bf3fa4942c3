"""The store's limits and the argument checks every operation runs before it touches Redis.

Checking here, in Python, keeps malformed ids out of key names and oversized values out of Redis;
the errors name the offending field (ValidationError), as the gRPC services report them.
"""

from __future__ import annotations

from services.wire.errors import ValidationError
from services.wire.ids import check_id

STATUSES = ("created", "active", "ended")
MAX_OPTIONS_BYTES = 4096
MAX_ROOM_CHARS = 256
MAX_ENTRY_BYTES = 1 << 20  # one history entry's blob
MAX_STATE_BYTES = 64 << 20  # the latest_state blob
MAX_PORTRAIT_BYTES = 1 << 20  # one avatar portrait (limits.proto MAX_IMAGE_BYTES)


def check_ids(session_id: str, tenant_id: str) -> None:
    check_id("session_id", session_id)
    check_id("tenant_id", tenant_id)


def check_blob(name: str, value: bytes, limit: int) -> bytes:
    """The value as bytes, if it is bytes-like and at most `limit` bytes long."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise ValidationError(name, f"expected bytes, got {type(value).__name__}")
    if len(value) > limit:
        raise ValidationError(name, f"{len(value)} bytes exceeds the limit of {limit} bytes")
    return bytes(value)


def check_status(status: str) -> None:
    if status not in STATUSES:
        raise ValidationError("status", f"got {status!r}; expected one of {STATUSES}")


def ttl_ms(seconds: float) -> int:
    """A TTL in whole milliseconds, never 0 (Redis rejects PX 0)."""
    return max(1, round(seconds * 1000))
