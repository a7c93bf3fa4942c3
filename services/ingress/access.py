"""Who may do what at the public door: the token's claims against a request (Ray-free).

The token decides the tenant. A request that names another tenant, another tenant's session, or
(with a session token, claim `sid`) any session but the token's, is answered NOT_FOUND with the
message of an unknown id: a caller can never tell "exists but not yours" from "does not exist".

- AvatarSession.Stream: `check_start` (in `session.open_session`): with a session token,
  Start.session_id must be the token's session (empty: INVALID_ARGUMENT; another: NOT_FOUND).
- The model RPCs forwarded by the ingress (`authorize_call`): tenant_id must be the token's, the
  session the token's when it is a session token; the stateless services (AudioFeatures,
  MotionEncoder.EncodeUserMotion, FrameDecoder) keep no session state, so the session's existence
  and tenant are checked here; the generator checks them itself.
"""

from __future__ import annotations

from typing import Any

from services.common.auth import TokenClaims
from services.store import SessionStore
from services.wire.errors import NotFoundError, SessionNotFoundError, ValidationError
from services.wire.ids import check_id

__all__ = ["STORE_CHECKED", "authorize_call", "check_start_session", "foreign_tenant_error"]

# RPCs whose services do not look the session up themselves: the ingress does.
STORE_CHECKED = frozenset({"Extract", "EncodeUserMotion", "Decode"})


def foreign_tenant_error(named: str) -> NotFoundError:
    """A request naming a tenant that is not the token's: the same answer whether it exists or not."""
    return NotFoundError(f"tenant_id: no tenant {named!r} for this credential (the token decides the tenant)")


async def authorize_call(store: SessionStore, claims: TokenClaims, method: str, request: Any) -> None:
    """Raise unless the token may make this call (NOT_FOUND, never PERMISSION_DENIED, for others' ids)."""
    if method == "EncodePortrait":  # no session: the avatar is stored under the request's tenant
        if request.tenant_id != claims.tenant_id:
            raise foreign_tenant_error(request.tenant_id)
        return
    session_id = check_id("session_id", request.session_id)
    if request.tenant_id != claims.tenant_id:
        raise SessionNotFoundError(session_id)
    if claims.session_id is not None and session_id != claims.session_id:
        raise SessionNotFoundError(session_id)
    if method in STORE_CHECKED:
        await store.get(session_id, claims.tenant_id)  # SessionNotFoundError: unknown or another tenant's


def check_start_session(start_session_id: str, token_session_id: str | None) -> None:
    """A session token streams only its session: Start.session_id must name it."""
    if token_session_id is None:
        return
    if not start_session_id:
        raise ValidationError(
            "start.session_id",
            "empty; this is a session token, valid for one session only: set start.session_id to that session",
        )
    if start_session_id != token_session_id:
        raise SessionNotFoundError(start_session_id)  # as for an unknown id: no hint that it exists
