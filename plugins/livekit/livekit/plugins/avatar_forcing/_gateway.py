"""The few gateway calls the plugin makes (POST /v1/sessions, DELETE /v1/sessions/{id}), over
aiohttp (a dependency of livekit-agents already), with bounded retries.

Retried: connection errors, timeouts and 5xx answers (the gateway answers 503 with Retry-After
when Redis or Serve is unavailable), at most `max_retries` times, waiting `retry_interval`
doubled per try (capped at MAX_BACKOFF_S) or the answer's Retry-After if larger (also capped).
Not retried: 4xx (bad key, unknown avatar, bad options, quotas) — the caller gets the gateway's
error at once.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from livekit.agents import APIConnectionError

from .errors import AvatarForcingError, AvatarForcingQuotaError
from .log import logger

MAX_BACKOFF_S = 5.0


def _retry_after(headers: Any) -> float | None:
    try:
        value = float(headers.get("Retry-After", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def gateway_error(status: int, body: Any, headers: Any) -> AvatarForcingError:
    """The gateway's error shape: {"error": {"code", "message", "field"?, "limit"?}}."""
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {"message": body if isinstance(body, str) and body else f"HTTP {status}"}
    cls = AvatarForcingQuotaError if status == 429 else AvatarForcingError
    return cls(
        str(detail.get("message") or f"HTTP {status}"),
        status_code=status,
        code=str(detail.get("code") or ""),
        field=detail.get("field"),
        limit=detail.get("limit"),
        retry_after_s=_retry_after(headers),
        request_id=headers.get("X-Request-ID"),
        body=body,
    )


class GatewayClient:
    def __init__(
        self,
        api_url: str,
        api_key: str,
        *,
        http_session: aiohttp.ClientSession | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        retry_interval: float = 0.5,
    ) -> None:
        self.api_url = api_url
        self._api_key = api_key
        self._session = http_session
        self._own_session = http_session is None
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.max_retries = max(0, int(max_retries))
        self.retry_interval = max(0.0, float(retry_interval))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession()
            self._own_session = True
        return self._session

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        """(status, JSON body) of a 2xx answer; AvatarForcingError for a 4xx (or a 5xx after the
        retries); APIConnectionError when the gateway cannot be reached after the retries."""
        url = self.api_url + path
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        attempt = 0
        while True:
            retry_after: float | None = None
            try:
                async with self._http().request(method, url, json=body, headers=headers, timeout=self._timeout) as resp:
                    text = await resp.text()
                    try:
                        data: Any = json.loads(text) if text else None
                    except ValueError:
                        data = text
                    if resp.status < 400:
                        return resp.status, data
                    error = gateway_error(resp.status, data, resp.headers)
                    if resp.status < 500 or attempt >= self.max_retries:
                        raise error
                    retry_after = error.retry_after_s
                    reason: str = f"{resp.status} {error.code or ''}".strip()
            except (TimeoutError, aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                if attempt >= self.max_retries:
                    raise APIConnectionError(
                        f"avatar-forcing gateway at {self.api_url} unreachable ({method} {path}, "
                        f"{attempt + 1} tries): {type(exc).__name__}: {exc}"
                    ) from exc
                reason = type(exc).__name__
            delay = min(MAX_BACKOFF_S, self.retry_interval * (2**attempt))
            if retry_after is not None:
                delay = max(delay, min(MAX_BACKOFF_S, retry_after))
            attempt += 1
            logger.warning(
                "avatar-forcing gateway: %s %s failed (%s); retry %d/%d in %.2f s",
                method, path, reason, attempt, self.max_retries, delay,
            )  # fmt: skip
            await asyncio.sleep(delay)

    async def aclose(self) -> None:
        if self._own_session and self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None
