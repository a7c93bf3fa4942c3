"""Identifiers on the wire: session, tenant, avatar and replica ids share one alphabet."""

from __future__ import annotations

import re

from services.wire.errors import ValidationError

ID_PATTERN = "[A-Za-z0-9_-]{1,64}"
ID_RE = re.compile(rf"^{ID_PATTERN}$")


def is_valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.match(value) is not None


def check_id(name: str, value: str) -> str:
    """`value` unchanged when it is a valid id; ValidationError naming `name` otherwise."""
    if not is_valid_id(value):
        raise ValidationError(name, f"got {value!r}; expected 1-64 characters of {ID_PATTERN}")
    return value
