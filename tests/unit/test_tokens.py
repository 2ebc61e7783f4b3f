"""Retrieval tokens, pure: issued, verified, refused for every reason a gateway must refuse."""

from __future__ import annotations

import base64
import datetime as dt
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from sharing.tokens import (
    TOKEN_TYPE,
    Grant,
    SigningKey,
    TokenExpired,
    TokenInvalid,
    TokenNotYetValid,
    TokenUnknownKey,
    covers,
    jwks,
    token_hash,
    token_issue,
    token_verify,
)

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
ISSUER, GATEWAY = "https://relais.example/", "https://relais.example/dicomweb"
KEY = SigningKey("2026-11-28-a", Ed25519PrivateKey.generate())
OLD = SigningKey("2026-10-01-z", Ed25519PrivateKey.generate())
PUBLIC = {KEY.kid: KEY.public_key, OLD.kid: OLD.public_key}
GRANT = Grant(
    subject="10000000001",
    studies=("1.2.3.1", "1.2.3.2"),
    purpose="avis",
    ticket="0b6f7a9e-3c1d-4f5a-9b2e-6d8c7a1f0e42",
    not_after=NOW + dt.timedelta(days=7),
)


def issue(**kwargs):
    arguments = {"key": KEY, "grant": GRANT, "issuer": ISSUER, "audience": GATEWAY, "now": NOW}
    return token_issue(**{**arguments, **kwargs})


def verify(token, **kwargs):
    arguments = {"public_keys": PUBLIC, "issuer": ISSUER, "audience": GATEWAY, "now": NOW}
    return token_verify(token, **{**arguments, **kwargs})


def test_a_token_carries_its_grant_and_verifies():
    token, claims = issue()
    verified = verify(token)
    assert verified == claims
    assert verified.studies == GRANT.studies
    assert (verified.purpose, verified.ticket, verified.subject) == (
        "avis",
        GRANT.ticket,
        GRANT.subject,
    )
    assert verified.expires_at - verified.issued_at == dt.timedelta(minutes=15)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "EdDSA", "kid": KEY.kid, "typ": TOKEN_TYPE}
    assert covers(verified, ["1.2.3.1"])
    assert not covers(verified, ["1.2.3.1", "9.9.9"])


def test_a_token_never_outlives_its_grant():
    grant = Grant(**{**GRANT.__dict__, "not_after": NOW + dt.timedelta(minutes=4)})
    _, claims = issue(grant=grant)
    assert claims.expires_at == NOW + dt.timedelta(minutes=4)
    ended = Grant(**{**GRANT.__dict__, "not_after": NOW})
    with pytest.raises(ValueError, match="ended"):
        issue(grant=ended)


def test_expiry_and_not_before_are_checked_against_the_given_time():
    token, _ = issue()
    assert verify(token, now=NOW + dt.timedelta(minutes=14, seconds=59))
    with pytest.raises(TokenExpired):
        verify(token, now=NOW + dt.timedelta(minutes=15))
    with pytest.raises(TokenNotYetValid):
        verify(token, now=NOW - dt.timedelta(seconds=1))
    assert verify(token, now=NOW - dt.timedelta(seconds=1), leeway=dt.timedelta(seconds=5))


def test_another_audience_or_issuer_is_refused():
    token, _ = issue()
    with pytest.raises(TokenInvalid):
        verify(token, audience="https://elsewhere.example/")
    with pytest.raises(TokenInvalid):
        verify(token, issuer="https://elsewhere.example/")


def test_an_old_key_still_verifies_its_tokens_an_unknown_one_does_not():
    old_token, _ = issue(key=OLD)
    assert verify(old_token).subject == GRANT.subject
    with pytest.raises(TokenUnknownKey):
        verify(old_token, public_keys={KEY.kid: KEY.public_key})


def _forge(header: dict, payload: dict, signature: bytes = b"") -> str:
    def part(value: bytes) -> str:
        return base64.urlsafe_b64encode(value).rstrip(b"=").decode()

    return ".".join(
        [part(json.dumps(header).encode()), part(json.dumps(payload).encode()), part(signature)]
    )


def test_forged_tampered_and_confused_tokens_are_refused():
    token, _ = issue()
    _, payload_b64, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(payload_b64 + "=="))
    # Another study slipped into the scope: the signature no longer matches.
    payload["studies"].append("6.6.6")
    widened = _forge(jwt.get_unverified_header(token), payload).rsplit(".", 1)[0] + "." + signature
    with pytest.raises(TokenInvalid):
        verify(widened)
    # "alg": "none".
    with pytest.raises(TokenInvalid):
        verify(_forge({"alg": "none", "kid": KEY.kid, "typ": TOKEN_TYPE}, payload))
    # HS256 keyed with the public key (algorithm confusion).
    public_pem = KEY.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    confused = jwt.encode(
        payload, "x" * 32, algorithm="HS256", headers={"kid": KEY.kid, "typ": TOKEN_TYPE}
    )
    assert public_pem
    with pytest.raises(TokenInvalid):
        verify(confused)
    # Another kind of JWT of the region, signed by the same key, without our typ.
    untyped = jwt.encode(payload, KEY.private_key, algorithm="EdDSA", headers={"kid": KEY.kid})
    with pytest.raises(TokenInvalid):
        verify(untyped)
    # A claim missing.
    del payload["ticket"]
    unticketed = jwt.encode(
        payload, KEY.private_key, algorithm="EdDSA", headers={"kid": KEY.kid, "typ": TOKEN_TYPE}
    )
    with pytest.raises(TokenInvalid):
        verify(unticketed)
    with pytest.raises(TokenInvalid):
        verify("not.a.token")


def test_the_hash_is_what_the_audit_keeps_and_the_jwks_publishes_the_public_keys():
    token, _ = issue()
    assert token_hash(token) == token_hash(token)
    assert len(token_hash(token)) == 64
    assert token not in token_hash(token)
    published = jwks(PUBLIC)
    assert [k["kid"] for k in published["keys"]] == sorted(PUBLIC)
    for entry in published["keys"]:
        assert entry["kty"] == "OKP"
        assert entry["crv"] == "Ed25519"
        key = jwt.PyJWK(entry)
        assert key.algorithm_name == "EdDSA"
    # A verifier that only has the JWKS verifies the token.
    from_jwks = {k["kid"]: jwt.PyJWK(k).key for k in published["keys"]}
    assert verify(token, public_keys=from_jwks).subject == GRANT.subject


def test_keys_load_from_the_pem_files_the_broker_generates(tmp_path):
    from broker.keys import load_or_create_signing_key

    path = load_or_create_signing_key(tmp_path)
    key = SigningKey.from_pem(path.stem, path.read_bytes())
    token, _ = issue(key=key)
    assert verify(token, public_keys={key.kid: key.public_key}).ticket == GRANT.ticket
