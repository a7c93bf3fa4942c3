"""Tenant-scoped bearer tokens: JWT, HS256, signed with one shared secret.

    secret = auth_secret()                                  # AVATAR_FORCING_AUTH_SECRET
    token = mint_token("acme", secret, ttl_s=3600)          # the gateway hands this to a client
    tenant_id = verify_token(token, secret)                 # "acme", or AuthError (UNAUTHENTICATED)
    tenant_id = tenant_from_grpc_metadata(context.invocation_metadata(), start.auth_token, secret=secret)
    claims = claims_from_grpc_metadata(context.invocation_metadata(), start.auth_token)  # + .session_id

Claims: `tenant` (the tenant id, [A-Za-z0-9_-]{1,64}), `exp` (expiry, seconds since the epoch;
required), `iat`, an optional `scope` (space-separated, e.g. "session avatar:write"; a token
without `scope` is not restricted) and an optional `sid`: a session token, which the gateway
hands out for one session, names the only session it may stream (the ingress enforces it:
Start.session_id must be that session, and the model RPCs may only name it). The token decides
the tenant; a request that names another tenant, or another tenant's session or avatar, is
answered NOT_FOUND exactly as for an unknown id.

A bad token raises `AuthError` (an `UnauthenticatedError`, so handlers answer UNAUTHENTICATED)
whose `reason` is one of `REASONS` and whose message says what is wrong - never the token
itself: tokens are credentials and never appear in errors or logs.

PyJWT encodes and verifies the tokens; the time checks (expiry, not-before, leeway) are ours,
so that they run with the caller's clock.

The secret comes from AVATAR_FORCING_AUTH_SECRET (at least 32 bytes). Only the local launcher
(`avatar-forcing serve`) falls back to a development secret, random per process (`dev_secret()`,
so a launcher left reachable on a network never accepts tokens anyone could mint), and says so.

Mint a token from a shell (the secret from the environment):

    python -m services.common.auth --tenant acme --ttl 3600
"""

from __future__ import annotations

import argparse
import hmac
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from services.wire.errors import PermissionDeniedError, UnauthenticatedError

SECRET_ENV = "AVATAR_FORCING_AUTH_SECRET"
MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
ALGORITHM = "HS256"
MAX_TOKEN_BYTES = 4096  # Limit.MAX_AUTH_TOKEN_BYTES (limits.proto)
DEFAULT_TTL_S = 3600.0
MAX_TTL_S = 366 * 24 * 3600.0
LEEWAY_S = 5.0  # clock skew allowed between the minting and the verifying machine

REASONS = ("missing", "malformed", "bad_signature", "expired", "not_yet_valid", "missing_tenant")
_TENANT_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_SCOPE_RE = re.compile(r"^[\x21-\x7e]{1,64}$")  # one scope: printable ASCII without spaces


class AuthError(UnauthenticatedError):
    """A missing or bad token. `reason` is one of `REASONS`; the message never contains the token."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"authorization: {message}")
        self.reason = reason
        self._message = message

    def __reduce__(self) -> tuple[type[AuthError], tuple[str, str]]:
        # Picklable with both arguments: Ray carries errors from a replica to the proxy.
        return (type(self), (self.reason, self._message))


class ScopeError(PermissionDeniedError):
    """A valid token whose `scope` does not allow the operation (PERMISSION_DENIED)."""


class AuthConfigError(RuntimeError):
    """The server has no usable secret: a deployment problem, not the client's (INTERNAL)."""


@dataclass(frozen=True)
class TokenClaims:
    tenant_id: str
    expires_at: float  # seconds since the epoch
    scopes: frozenset[str] | None  # None: the token has no `scope` claim (not restricted)
    session_id: str | None = None  # `sid`: the one session a session token may stream (None: any)

    def allows(self, scope: str) -> bool:
        return self.scopes is None or scope in self.scopes


# --- secret ---------------------------------------------------------------------------------------


def check_secret(secret: str | bytes) -> bytes:
    """The secret as bytes; AuthConfigError when it is empty or shorter than MIN_SECRET_BYTES."""
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    if len(key) < MIN_SECRET_BYTES:
        raise AuthConfigError(
            f"{SECRET_ENV}: the secret is {len(key)} bytes; expected at least {MIN_SECRET_BYTES} "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(48))'`)"
        )
    return key


_DEV_SECRET: str | None = None


def dev_secret() -> str:
    """The development secret of this process: random, made on first use, never printed."""
    global _DEV_SECRET
    if _DEV_SECRET is None:
        _DEV_SECRET = "dev-" + secrets.token_urlsafe(48)
    return _DEV_SECRET


def is_dev_secret(secret: str | bytes) -> bool:
    key = secret.encode() if isinstance(secret, str) else bytes(secret)
    return _DEV_SECRET is not None and hmac.compare_digest(key, _DEV_SECRET.encode())


def auth_secret(environ: Mapping[str, str] | None = None, *, allow_dev: bool = False) -> str:
    """The signing secret from AVATAR_FORCING_AUTH_SECRET.

    Unset: `dev_secret()` when `allow_dev` (the local launcher, which prints that it does so),
    else AuthConfigError. A set but short secret is always an error.
    """
    env = os.environ if environ is None else environ
    secret = env.get(SECRET_ENV, "").strip()
    if not secret:
        if allow_dev:
            return dev_secret()
        raise AuthConfigError(f"{SECRET_ENV} is not set; the services cannot verify tokens without it")
    check_secret(secret)
    return secret


# --- mint -----------------------------------------------------------------------------------------


def _check_scopes(scope: str | Iterable[str] | None) -> str | None:
    if scope is None:
        return None
    items = scope.split() if isinstance(scope, str) else list(scope)
    for item in items:
        if not isinstance(item, str) or not _SCOPE_RE.match(item):
            raise ValueError(f"scope: got {item!r}; expected 1-64 printable ASCII characters without spaces")
    if not items:
        raise ValueError("scope: got no scopes; pass None for an unrestricted token")
    return " ".join(items)


def mint_token(
    tenant_id: str,
    secret: str | bytes,
    ttl_s: float = DEFAULT_TTL_S,
    *,
    scope: str | Iterable[str] | None = None,
    session_id: str | None = None,
    now: float | None = None,
) -> str:
    """A signed token for `tenant_id`, valid for `ttl_s` seconds (at most MAX_TTL_S); with
    `session_id`, a session token that may stream only that session."""
    if not isinstance(tenant_id, str) or not _TENANT_RE.match(tenant_id):
        raise ValueError(f"tenant_id: got {tenant_id!r}; expected [A-Za-z0-9_-]{{1,64}}")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise ValueError(f"ttl_s: got {ttl_s!r}; expected seconds in (0, {MAX_TTL_S:.0f}]")
    key = check_secret(secret)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"tenant": tenant_id, "iat": issued, "exp": issued + max(1, round(ttl_s))}
    scope_text = _check_scopes(scope)
    if scope_text is not None:
        claims["scope"] = scope_text
    if session_id is not None:
        if not isinstance(session_id, str) or not _TENANT_RE.match(session_id):
            raise ValueError(f"session_id: got {session_id!r}; expected [A-Za-z0-9_-]{{1,64}}")
        claims["sid"] = session_id
    return jwt.encode(claims, key, algorithm=ALGORITHM)


# --- verify ---------------------------------------------------------------------------------------


def verify_claims(token: str | bytes, secret: str | bytes, *, now: float | None = None) -> TokenClaims:
    """The claims of a valid token; AuthError (with a reason) otherwise."""
    key = check_secret(secret)
    if isinstance(token, bytes):
        try:
            token = token.decode("ascii")
        except UnicodeDecodeError:
            raise AuthError("malformed", "the token is not ASCII text; expected a JWT") from None
    if not isinstance(token, str) or not token.strip():
        raise AuthError("missing", "no token; expected `authorization: Bearer <token>`")
    token = token.strip()
    if len(token) > MAX_TOKEN_BYTES:
        raise AuthError("malformed", f"the token is {len(token)} bytes; expected at most {MAX_TOKEN_BYTES}")
    current = time.time() if now is None else now
    return _claims(_decode(token, key, current))


def verify_token(token: str | bytes, secret: str | bytes, *, scope: str | None = None, now: float | None = None) -> str:
    """The tenant id of a valid token; AuthError otherwise, ScopeError when `scope` is not allowed."""
    claims = verify_claims(token, secret, now=now)
    if scope is not None and not claims.allows(scope):
        raise ScopeError(f"authorization: the token's scope does not include {scope!r}")
    return claims.tenant_id


def _claims(payload: Any) -> TokenClaims:
    if not isinstance(payload, dict):
        raise AuthError("malformed", "the token's payload is not a JSON object")
    tenant = payload.get("tenant")
    if tenant is None or tenant == "":
        raise AuthError("missing_tenant", "the token has no `tenant` claim")
    if not isinstance(tenant, str) or not _TENANT_RE.match(tenant):
        raise AuthError("missing_tenant", "the token's `tenant` claim is not an id of [A-Za-z0-9_-]{1,64}")
    scope = payload.get("scope")
    if scope is not None and (not isinstance(scope, str) or not scope.split()):
        raise AuthError("malformed", "the token's `scope` claim is not a space-separated string")
    scopes = frozenset(scope.split()) if scope is not None else None
    session_id = payload.get("sid")
    if session_id is not None and (not isinstance(session_id, str) or not _TENANT_RE.match(session_id)):
        raise AuthError("malformed", "the token's `sid` claim is not an id of [A-Za-z0-9_-]{1,64}")
    return TokenClaims(tenant_id=tenant, expires_at=float(payload["exp"]), scopes=scopes, session_id=session_id)


def _decode(token: str, key: bytes, now: float) -> Any:
    errors = jwt.exceptions
    try:
        # `algorithms` pins HS256: "none" and algorithm-confusion tokens are rejected.
        # Times are checked below with the caller's clock.
        options = {"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False}
        payload = jwt.decode(token, key, algorithms=[ALGORITHM], options=options)
    except errors.InvalidSignatureError:
        raise AuthError(
            "bad_signature", "the token's signature does not match (wrong secret or altered token)"
        ) from None
    except errors.MissingRequiredClaimError as exc:
        raise AuthError("malformed", f"the token has no `{exc.claim}` claim") from None
    except errors.InvalidAlgorithmError:
        raise AuthError("malformed", f"the token's algorithm is not {ALGORITHM}") from None
    except errors.PyJWTError as exc:  # DecodeError and the rest
        detail = str(exc)[:120]
        if any(len(part) >= 8 and part in detail for part in token.split(".")):
            detail = "details withheld"  # never echo the token
        raise AuthError("malformed", f"not a valid JWT ({type(exc).__name__}: {detail})") from None
    _check_times(payload, now)  # with the caller's clock (tests pass `now`)
    return payload


def _number(payload: dict[str, Any], name: str) -> float | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError("malformed", f"the token's `{name}` claim is not a number of seconds")
    return float(value)


def _check_times(payload: dict[str, Any], now: float) -> None:
    expires = _number(payload, "exp")
    if expires is None:
        raise AuthError("malformed", "the token has no `exp` claim")
    if now > expires + LEEWAY_S:
        raise AuthError("expired", f"the token expired {now - expires:.0f} s ago; ask for a new one")
    for name in ("nbf", "iat"):
        start = _number(payload, name)
        if start is not None and start > now + LEEWAY_S:
            raise AuthError("not_yet_valid", f"the token is not valid yet (`{name}` is in the future)")


# --- gRPC -----------------------------------------------------------------------------------------


def _metadata_items(metadata: Any) -> list[tuple[str, Any]]:
    """(key, value) pairs of grpc.aio.Metadata, a sequence of pairs or _Metadatum, or a mapping."""
    if metadata is None:
        return []
    if isinstance(metadata, Mapping):
        return list(metadata.items())
    items = []
    for item in metadata:
        if hasattr(item, "key") and hasattr(item, "value"):
            items.append((item.key, item.value))
        else:
            key, value = item
            items.append((key, value))
    return items


def bearer_token(metadata: Any) -> str | None:
    """The token of the `authorization: Bearer <token>` entry; None without one."""
    values = [value for key, value in _metadata_items(metadata) if str(key).lower() == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise AuthError("malformed", f"{len(values)} authorization entries; expected one")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = str(value).strip().partition(" ")
    if scheme.lower() != "bearer":
        raise AuthError("malformed", "the authorization entry is not `Bearer <token>`")
    token = token.strip()
    if not token:
        raise AuthError("missing", "the authorization entry has no token after `Bearer`")
    return token


def claims_from_grpc_metadata(
    metadata: Any,
    fallback_token: str | bytes | None = None,
    *,
    secret: str | bytes | None = None,
    scope: str | None = None,
    now: float | None = None,
) -> TokenClaims:
    """The claims of a call's token: the `authorization: Bearer` metadata, else `fallback_token`
    (session.proto Start.auth_token, for clients that cannot set metadata).

    The metadata wins when both are present. `secret` defaults to AVATAR_FORCING_AUTH_SECRET.
    AuthError without a valid token; ScopeError when `scope` is given and not allowed.
    """
    token = bearer_token(metadata)
    if token is None and fallback_token:
        token = fallback_token
    if not token:
        raise AuthError("missing", "no token; expected call metadata `authorization: Bearer <token>`")
    claims = verify_claims(token, auth_secret() if secret is None else secret, now=now)
    if scope is not None and not claims.allows(scope):
        raise ScopeError(f"authorization: the token's scope does not include {scope!r}")
    return claims


def tenant_from_grpc_metadata(
    metadata: Any,
    fallback_token: str | bytes | None = None,
    *,
    secret: str | bytes | None = None,
    scope: str | None = None,
    now: float | None = None,
) -> str:
    """The tenant of a call (`claims_from_grpc_metadata(...).tenant_id`)."""
    return claims_from_grpc_metadata(metadata, fallback_token, secret=secret, scope=scope, now=now).tenant_id


def grpc_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries `token` (client side)."""
    return (("authorization", f"Bearer {token}"),)


# --- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.auth", description=f"mint a tenant token with {SECRET_ENV}"
    )
    parser.add_argument("--tenant", required=True, help="tenant id, [A-Za-z0-9_-]{1,64}")
    parser.add_argument("--ttl", type=float, default=DEFAULT_TTL_S, help="seconds the token is valid")
    parser.add_argument("--scope", help="space-separated scopes (default: unrestricted)")
    args = parser.parse_args(argv)
    try:
        print(mint_token(args.tenant, auth_secret(), args.ttl, scope=args.scope))
    except (ValueError, AuthConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
