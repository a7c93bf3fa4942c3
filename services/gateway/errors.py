"""Service errors -> HTTP answers. Every error body has one shape:

    {"error": {"code": "not_found", "message": "...", "field": "avatar_id", "limit": "..."}}

| error                                   | status | notes                                             |
|-----------------------------------------|--------|---------------------------------------------------|
| ValidationError, a request that does not match the schema | 422 | `field` names the offending field   |
| PayloadTooLargeError (a body over the app's cap) | 413 | before the body is read                           |
| UnsupportedMediaTypeError (not JPEG/PNG)     | 415    |                                                   |
| UnauthenticatedError                    | 401    | with `WWW-Authenticate: Bearer`                    |
| PermissionDeniedError (a token's scope) | 403    |                                                   |
| NotFoundError (also another tenant's id)| 404    | never 403: ids do not leak across tenants         |
| ConflictError, FailedPreconditionError  | 409    |                                                   |
| QuotaExceededError (portrait size too)  | 429    | `limit` names it; `Retry-After` when known         |
| CapacityExceededError (replica limits)  | 503    | with Retry-After                                  |
| UnavailableError (Redis, Serve)         | 503    | `Retry-After: 1`                                  |
| anything else                           | 500    | a generic message; the traceback goes to the log  |
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.gateway.logs import log, redact
from services.wire.errors import (
    CapacityExceededError,
    ConflictError,
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    ServiceError,
    UnauthenticatedError,
    UnavailableError,
    ValidationError,
)


class PayloadTooLargeError(ServiceError):
    def __init__(self, limit: str, message: str) -> None:
        super().__init__(f"{limit}: {message}")
        self.limit = limit


class UnsupportedMediaTypeError(ServiceError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": redact(message)[:1000], **{k: v for k, v in extra.items() if v}}}


def _status(exc: ServiceError) -> tuple[int, str]:
    table: list[tuple[type[BaseException], int, str]] = [
        (PayloadTooLargeError, 413, "payload_too_large"),
        (UnsupportedMediaTypeError, 415, "unsupported_media_type"),
        (ValidationError, 422, "invalid_argument"),
        (UnauthenticatedError, 401, "unauthenticated"),
        (NotFoundError, 404, "not_found"),
        (PermissionDeniedError, 403, "permission_denied"),
        (QuotaExceededError, 429, "quota_exceeded"),
        (CapacityExceededError, 503, "capacity_exceeded"),
        (UnavailableError, 503, "unavailable"),
        (ConflictError, 409, "conflict"),
        (FailedPreconditionError, 409, "failed_precondition"),
    ]
    for cls, status, code in table:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def service_error_response(exc: ServiceError) -> JSONResponse:
    status, code = _status(exc)
    headers: dict[str, str] = {}
    limit = getattr(exc, "limit", None)
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    retry = getattr(exc, "retry_after_s", None)
    if status == 429 and retry is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry)))
    elif status == 503:
        headers["Retry-After"] = "1"
    message = str(exc) if status != 500 else "internal error"
    if status >= 500:
        log.warning("request failed: %s", message, extra={"event": "error", "status": status})
    body = error_body(code, message, field=getattr(exc, "field", None), limit=limit)
    return JSONResponse(body, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_request_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path", "header")]
        field = ".".join(loc) or "request"
        details = [
            {"field": ".".join(str(p) for p in e.get("loc", ())), "message": str(e.get("msg", ""))[:200]}
            for e in errors[:10]
        ]
        body = error_body("invalid_argument", f"{field}: {first.get('msg', 'invalid request')}", field=field)
        body["error"]["details"] = details
        return JSONResponse(body, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(
            exc.status_code, "error"
        )
        return JSONResponse(
            error_body(code, str(exc.detail)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error", exc_info=exc, extra={"event": "error", "status": 500})
        return JSONResponse(error_body("internal", "internal error"), status_code=500)
