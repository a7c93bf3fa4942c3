"""The store's limits and the argument checks every operation runs before it touches Redis.

Checking here, in Python, keeps malformed ids out of key names and oversized values out of Redis;
the errors name the offending field (ValidationError), as the gRPC services report them.
"""

from __future__ import annotations

import math
import re

from services.wire.errors import ValidationError
from services.wire.ids import check_id

# A session's life (SessionRecord.status): pending (created, nobody streams it yet: the gateway's
# create) -> active (an AvatarSession.Stream drives it) -> stopping (request_stop: the stream ends
# after its current block) -> closed (the record and every key of it are deleted; `close` announces
# it on the reaped channel with reason "closed", so a reader sees "closed" only there).
STATUSES = ("pending", "active", "stopping", "closed")
MAX_FIGURES = 16  # entries of SessionRecord.figures
_FIGURE_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
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


def check_figures(figures: dict[str, float]) -> dict[str, float]:
    """Figures as {name: finite float}: at most MAX_FIGURES, names of [a-z][a-z0-9_]{0,63}."""
    if not isinstance(figures, dict):
        raise ValidationError("figures", f"expected a dict of name -> number, got {type(figures).__name__}")
    if len(figures) > MAX_FIGURES:
        raise ValidationError("figures", f"{len(figures)} entries; expected at most {MAX_FIGURES}")
    checked = {}
    for name, value in figures.items():
        if not isinstance(name, str) or not _FIGURE_NAME.fullmatch(name):
            raise ValidationError("figures", f"name {name!r}; expected [a-z][a-z0-9_]{{0,63}}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValidationError(f"figures.{name}", f"got {value!r}; expected a finite number")
        checked[name] = float(value)
    return checked
