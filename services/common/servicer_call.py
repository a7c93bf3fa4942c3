"""Calling a servicer method from a Ray Serve deployment method.

Under Serve's gRPC proxy the method gets a `grpc_context`: a failure sets its status code
and details, then returns an empty response of the RPC's type (`empty`) — Serve sends the
status, and routine bad input leaves no traceback in the logs — or, without `empty`, the
exception propagates (Serve keeps the status). Called through a deployment handle there is
no context and the typed exception itself reaches the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.wire.errors import ServiceError, set_status

log = logging.getLogger(__name__)


async def call_servicer(
    method: Callable[..., Awaitable[Any]], request: Any, grpc_context: Any = None, empty: type | None = None
) -> Any:
    try:
        return await method(request)
    except Exception as exc:
        if not isinstance(exc, ServiceError):
            log.exception("%s failed", getattr(method, "__qualname__", method))
        if grpc_context is None:
            raise
        set_status(grpc_context, exc)
        if empty is None:
            raise
        return empty()
