"""Tenant tokens (services.common.auth): minting and verifying, every rejection reason, gRPC
metadata parsing, and that a token never appears in an error."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import grpc
import pytest

from services.common import auth
from services.common.auth import AuthConfigError, AuthError, ScopeError, mint_token, verify_claims, verify_token
from services.wire.errors import UnauthenticatedError, status_of

SECRET = "unit-test-secret-that-is-long-enough-32"
OTHER = "another-unit-test-secret-long-enough-32"
NOW = 1_800_000_000.0


def b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def forge(header: dict, payload: dict | str, secret: str = SECRET) -> str:
    """A token with any header and payload (a str: its raw base64url text), correctly signed."""
    import hashlib
    import hmac

    signing_input = f"{b64(header)}.{payload if isinstance(payload, str) else b64(payload)}"
    signature = hmac.digest(secret.encode(), signing_input.encode(), hashlib.sha256)
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


def reject(token, secret=SECRET, now=NOW) -> AuthError:
    with pytest.raises(AuthError) as caught:
        verify_token(token, secret, now=now)
    assert isinstance(token, bytes) or not token or token not in str(caught.value)  # never echoed
    return caught.value


def test_round_trip_and_claims():
    token = mint_token("acme", SECRET, ttl_s=60, now=NOW)
    assert verify_token(token, SECRET, now=NOW + 59) == "acme"
    claims = verify_claims(token, SECRET, now=NOW)
    assert claims.tenant_id == "acme" and claims.expires_at == NOW + 60 and claims.scopes is None
    assert verify_token(token.encode(), SECRET, now=NOW) == "acme"  # bytes from metadata work too


def test_the_token_is_a_standard_hs256_jwt():
    token = mint_token("acme", SECRET, ttl_s=60, now=NOW, scope="session")
    header, payload, signature = token.split(".")
    assert json.loads(base64.urlsafe_b64decode(header + "==")) == {"alg": "HS256", "typ": "JWT"}
    assert json.loads(base64.urlsafe_b64decode(payload + "==")) == {
        "tenant": "acme",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "scope": "session",
    }
    expected = hmac.digest(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256)  # RFC 7515, by hand
    assert base64.urlsafe_b64decode(signature + "==") == expected


def test_expired():
    token = mint_token("acme", SECRET, ttl_s=60, now=NOW)
    assert verify_token(token, SECRET, now=NOW + 60 + auth.LEEWAY_S) == "acme"  # within the leeway
    error = reject(token, now=NOW + 120)
    assert error.reason == "expired" and "expired" in str(error)


def test_bad_signature():
    token = mint_token("acme", SECRET, now=NOW)
    assert reject(token, secret=OTHER).reason == "bad_signature"
    header, _payload, signature = token.split(".")
    tampered = f"{header}.{b64({'tenant': 'globex', 'iat': int(NOW), 'exp': int(NOW) + 60})}.{signature}"
    assert reject(tampered).reason == "bad_signature"


@pytest.mark.parametrize(
    "token",
    [
        "not-a-jwt",
        "a.b",
        "a.b.c.d",
        "!!!.???.***",
        forge({"alg": "HS256", "typ": "JWT"}, "bm90LWpzb24"),  # signed, but "not-json"
        forge({"alg": "HS256", "typ": "JWT"}, "%%%"),  # signed, but not base64url
    ],
)
def test_malformed(token):
    assert reject(token).reason == "malformed"


def test_algorithm_none_and_other_algorithms_are_refused():
    payload = {"tenant": "acme", "exp": NOW + 60}
    unsigned = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."
    assert reject(unsigned).reason == "malformed"
    assert reject(forge({"alg": "HS512", "typ": "JWT"}, payload)).reason == "malformed"


def test_claims_are_required():
    header = {"alg": "HS256", "typ": "JWT"}
    assert reject(forge(header, {"tenant": "acme"})).reason == "malformed"  # no exp
    assert reject(forge(header, {"tenant": "acme", "exp": "tomorrow"})).reason == "malformed"
    assert reject(forge(header, {"exp": NOW + 60})).reason == "missing_tenant"
    assert reject(forge(header, {"tenant": "", "exp": NOW + 60})).reason == "missing_tenant"
    assert reject(forge(header, {"tenant": "a/b", "exp": NOW + 60})).reason == "missing_tenant"
    assert reject(forge(header, {"tenant": 7, "exp": NOW + 60})).reason == "missing_tenant"
    assert reject(forge(header, {"tenant": "acme", "exp": NOW + 60, "nbf": NOW + 600})).reason == "not_yet_valid"
    assert reject(forge(header, ["not", "an", "object"])).reason == "malformed"


def test_missing_and_oversized_tokens():
    assert reject("").reason == "missing"
    assert reject("   ").reason == "missing"
    assert reject("x" * (auth.MAX_TOKEN_BYTES + 1)).reason == "malformed"
    assert reject(b"\xff\xfe").reason == "malformed"


def test_auth_error_is_unauthenticated():
    error = reject("not-a-jwt")
    assert isinstance(error, UnauthenticatedError)
    code, message = status_of(error)
    assert code == grpc.StatusCode.UNAUTHENTICATED and message.startswith("authorization: ")


def test_scope():
    limited = mint_token("acme", SECRET, now=NOW, scope=["session", "avatar:read"])
    assert verify_claims(limited, SECRET, now=NOW).scopes == {"session", "avatar:read"}
    assert verify_token(limited, SECRET, scope="session", now=NOW) == "acme"
    with pytest.raises(ScopeError, match="avatar:write"):
        verify_token(limited, SECRET, scope="avatar:write", now=NOW)
    assert status_of(ScopeError("x"))[0] == grpc.StatusCode.PERMISSION_DENIED
    unrestricted = mint_token("acme", SECRET, now=NOW)
    assert verify_token(unrestricted, SECRET, scope="anything", now=NOW) == "acme"


def test_mint_checks_its_arguments():
    with pytest.raises(ValueError, match="tenant_id"):
        mint_token("a b", SECRET)
    with pytest.raises(ValueError, match="tenant_id"):
        mint_token("x" * 65, SECRET)
    with pytest.raises(ValueError, match="ttl_s"):
        mint_token("acme", SECRET, ttl_s=0)
    with pytest.raises(ValueError, match="scope"):
        mint_token("acme", SECRET, scope="")
    with pytest.raises(AuthConfigError, match="at least 32"):
        mint_token("acme", "short")
    with pytest.raises(AuthConfigError, match="at least 32"):
        verify_token("a.b.c", "short")


def test_secret_from_the_environment():
    assert auth.auth_secret({auth.SECRET_ENV: SECRET}) == SECRET
    with pytest.raises(AuthConfigError, match=auth.SECRET_ENV):
        auth.auth_secret({})
    with pytest.raises(AuthConfigError, match="at least 32"):
        auth.auth_secret({auth.SECRET_ENV: "short"})
    dev = auth.auth_secret({}, allow_dev=True)
    assert dev == auth.dev_secret() and auth.is_dev_secret(dev) and not auth.is_dev_secret(SECRET)
    assert len(dev) >= auth.MIN_SECRET_BYTES
    assert auth.auth_secret({auth.SECRET_ENV: SECRET}, allow_dev=True) == SECRET  # a set secret wins


def test_tenant_from_grpc_metadata():
    token = mint_token("acme", SECRET, ttl_s=600)
    other = mint_token("globex", SECRET, ttl_s=600)
    assert auth.tenant_from_grpc_metadata((("authorization", f"Bearer {token}"),), secret=SECRET) == "acme"
    assert auth.tenant_from_grpc_metadata({"authorization": f"bearer  {token} "}, secret=SECRET) == "acme"
    assert auth.tenant_from_grpc_metadata(grpc.aio.Metadata(("authorization", f"Bearer {token}")), secret=SECRET)
    assert auth.tenant_from_grpc_metadata([("x-other", "1")], token, secret=SECRET) == "acme"  # Start.auth_token
    assert auth.tenant_from_grpc_metadata(auth.grpc_metadata(token), other, secret=SECRET) == "acme"  # metadata wins
    for metadata, fallback, reason in [
        ((), "", "missing"),
        (None, None, "missing"),
        ((("authorization", "Bearer "),), "", "missing"),
        ((("authorization", f"Basic {token}"),), "", "malformed"),
        ((("authorization", f"Bearer {token}"), ("authorization", f"Bearer {other}")), "", "malformed"),
        ((("authorization", "Bearer nonsense"),), token, "malformed"),
    ]:
        with pytest.raises(AuthError) as caught:
            auth.tenant_from_grpc_metadata(metadata, fallback, secret=SECRET)
        assert caught.value.reason == reason and token not in str(caught.value)


def test_tenant_from_grpc_metadata_reads_the_secret_from_the_environment(monkeypatch):
    token = mint_token("acme", SECRET, ttl_s=600)
    monkeypatch.setenv(auth.SECRET_ENV, SECRET)
    assert auth.tenant_from_grpc_metadata(auth.grpc_metadata(token)) == "acme"
    monkeypatch.delenv(auth.SECRET_ENV)
    with pytest.raises(AuthConfigError):
        auth.tenant_from_grpc_metadata(auth.grpc_metadata(token))


def test_mint_command(monkeypatch, capsys):
    monkeypatch.setenv(auth.SECRET_ENV, SECRET)
    assert auth.main(["--tenant", "acme", "--ttl", "60"]) == 0
    assert verify_token(capsys.readouterr().out.strip(), SECRET, now=time.time()) == "acme"
    monkeypatch.delenv(auth.SECRET_ENV)
    assert auth.main(["--tenant", "acme"]) == 2
    assert auth.SECRET_ENV in capsys.readouterr().err


def test_errors_survive_pickling():  # Ray carries exceptions from a replica to the proxy
    import pickle

    error = pickle.loads(pickle.dumps(reject("not-a-jwt")))
    assert isinstance(error, AuthError) and error.reason == "malformed" and str(error).startswith("authorization: ")
    scope = pickle.loads(pickle.dumps(ScopeError("authorization: no")))
    assert isinstance(scope, ScopeError) and str(scope) == "authorization: no"
