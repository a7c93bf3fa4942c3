"""Errors of the gateway's answers. Both are livekit-agents' `APIStatusError`, so the framework's
own handling (retryable or not, status code) applies to them."""

from __future__ import annotations

from typing import Any

from livekit.agents import APIStatusError


class AvatarForcingError(APIStatusError):
    """The gateway refused the request: `status_code`, the gateway's `code` (`unauthenticated`,
    `not_found`, `invalid_argument`, ...), its `message` and, for a bad field, `field`."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        code: str = "",
        field: str | None = None,
        limit: str | None = None,
        retry_after_s: float | None = None,
        request_id: str | None = None,
        body: Any = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code, request_id=request_id, body=body, retryable=retryable)
        self.code = code
        self.field = field
        self.limit = limit
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        what = f"avatar-forcing gateway answered {self.status_code}"
        if self.code:
            what += f" {self.code}"
        if self.limit:
            what += f" (limit {self.limit})"
        elif self.field:
            what += f" (field {self.field})"
        text = f"{what}: {self.message}"
        if self.retry_after_s is not None:
            text += f" (retry after {self.retry_after_s:g} s)"
        return text


class AvatarForcingQuotaError(AvatarForcingError):
    """429: a quota of the tenant is used up; `limit` names it (`max_concurrent_sessions`,
    `max_session_minutes`, `requests_per_minute`), `retry_after_s` says when it frees when known."""
