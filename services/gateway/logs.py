"""Structured logs of the gateway: one JSON object per line, with the request's tenant and session.

    log = logging.getLogger("services.gateway")
    log.info("session created", extra={"event": "session.create"})   # tenant_id, session_id added

Every record carries the ids of the request it belongs to (`request_id`, `tenant_id`, `session_id`,
`key_id` where known: context variables the dependencies and routes set). Nothing secret is ever
logged: request headers, bodies and query strings are not, and, as a second line, `redact` replaces
anything shaped like a credential (a JWT, an API key `afk_...`, a `Bearer ...` value) in the
message and the extra fields before a line is written.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from typing import Any

log = logging.getLogger("services.gateway")

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
tenant_id: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="")
session_id: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="")
key_id: contextvars.ContextVar[str] = contextvars.ContextVar("key_id", default="")
_CONTEXT = {"request_id": request_id, "tenant_id": tenant_id, "session_id": session_id, "key_id": key_id}

_SECRET_PATTERNS = (
    re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"),  # a JWT
    re.compile(r"afk_[A-Za-z0-9]+\.[A-Za-z0-9_-]+"),  # an API key
    re.compile(r"(?i)(bearer\s+)\S+"),  # an authorization value
)
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


def redact(text: str) -> str:
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(lambda m: (m.group(1) if m.groups() else "") + "[redacted]", text)
    return text


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class ContextFilter(logging.Filter):
    """Adds the request's ids to every record (an explicit `extra` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in _CONTEXT.items():
            if not getattr(record, name, ""):
                setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, message, the ids and the extra fields; redacted."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and value not in ("", None):
                entry[key] = value
        if record.exc_info:
            entry["error"] = self.formatException(record.exc_info)
        return redact(json.dumps(_clean(entry), default=str, sort_keys=False))


log.addFilter(ContextFilter())  # every gateway record gets the ids, whichever handler writes it


def configure_logging(level: int = logging.INFO, stream: Any = None) -> logging.Handler:
    """JSON lines on `stream` (stderr) for the gateway's logger; returns the handler (idempotent)."""
    for handler in log.handlers:
        if getattr(handler, "_gateway_json", False):
            return handler
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler._gateway_json = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    log.setLevel(level)
    log.propagate = True
    return handler
