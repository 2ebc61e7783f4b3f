"""Retrieval tokens, pure: issued, verified, refused for every reason a gateway must refuse."""

from __future__ import annotations

import base64
import datetime as dt
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

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


# ------------------------------------------------------------- the compact form, read strictly


def _b64(value: bytes) -> str:
    return base64.urlsafe_b64encode(value).rstrip(b"=").decode()


HEADER = {"alg": "EdDSA", "kid": KEY.kid, "typ": TOKEN_TYPE}


def _claims(**changes):
    token, _ = issue()
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[1] + "=="))
    return {**payload, **changes}


def _signed(header: dict | bytes = HEADER, payload: dict | bytes | None = None, key=KEY) -> str:
    """A token signed by ``key`` over exactly these bytes (dicts are dumped as JSON)."""
    if payload is None:
        payload = _claims()
    parts = [v if isinstance(v, bytes) else json.dumps(v).encode() for v in (header, payload)]
    signing_input = f"{_b64(parts[0])}.{_b64(parts[1])}"
    return f"{signing_input}.{_b64(key.private_key.sign(signing_input.encode()))}"


def test_what_we_sign_by_hand_verifies_so_the_refusals_below_are_for_their_one_change():
    assert verify(_signed()).ticket == GRANT.ticket
    assert verify(_signed(payload=_claims(aud=["https://other.example/", GATEWAY]))).ticket


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda t: t + ".", id="a fourth, empty segment"),
        pytest.param(lambda t: t + "." + t.split(".")[2], id="a fourth segment"),
        pytest.param(lambda t: t.rsplit(".", 1)[0], id="two segments"),
        pytest.param(lambda t: t.replace(".", "..", 1), id="an empty segment"),
        pytest.param(lambda t: t + "==", id="padding"),
        pytest.param(lambda t: t + "\n", id="a trailing newline"),
        pytest.param(lambda t: " " + t, id="a leading space"),
        pytest.param(lambda t: t[:10] + "+" + t[11:], id="the standard base64 alphabet"),
        pytest.param(lambda t: t[:10] + "é" + t[11:], id="a non-ASCII character"),
        pytest.param(lambda t: t + "A", id="a segment one character too long"),
        pytest.param(lambda t: t[:-1], id="a signature one character short"),
        pytest.param(lambda t: t[:-3], id="a signature two bytes short"),
        pytest.param(lambda t: t + "AA", id="a signature two bytes long"),
    ],
)
def test_anything_but_three_canonical_base64url_segments_is_refused(mangle):
    token, _ = issue()
    with pytest.raises(TokenInvalid):
        verify(mangle(token))


def test_the_same_signature_spelled_another_way_is_refused():
    # 64 bytes take 86 characters: the last one carries 2 bits and 4 that must be zero. Setting
    # one of those decodes to the same bytes (a valid signature), but the token is another
    # string, with another hash: the revocation list would not know it.
    token, _ = issue()
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    respelled = token[:-1] + alphabet[last | 1]
    assert respelled != token
    assert base64.urlsafe_b64decode(respelled.split(".")[2] + "==") == base64.urlsafe_b64decode(
        token.split(".")[2] + "=="
    )
    with pytest.raises(TokenInvalid):
        verify(respelled)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b'["EdDSA"]', id="a JSON array"),
        pytest.param(b'"EdDSA"', id="a JSON string"),
        pytest.param(b"null", id="null"),
        pytest.param(b"{alg: EdDSA}", id="not JSON"),
        pytest.param(b'{"alg": "EdDSA"} {}', id="JSON then more"),
        pytest.param(json.dumps(HEADER).encode("utf-16"), id="UTF-16"),
        pytest.param(
            b'{"alg": "EdDSA", "kid": "\xff", "typ": "' + TOKEN_TYPE.encode() + b'"}',
            id="not UTF-8",
        ),
        pytest.param(json.dumps(HEADER).encode()[:-1] + b', "alg": "EdDSA"}', id="alg given twice"),
        pytest.param(
            json.dumps({**HEADER, "typ": "JWT"}).encode()[:-1]
            + f', "typ": "{TOKEN_TYPE}"}}'.encode(),
            id="typ given twice, ours last",
        ),
        pytest.param({**HEADER, "crit": ["exp"], "exp": 1}, id="a critical extension"),
        pytest.param({**HEADER, "crit": ["b64"], "b64": False}, id="an unencoded payload"),
        pytest.param({**HEADER, "b64": False}, id="b64 false, not critical"),
        pytest.param({**HEADER, "kid": 7}, id="a kid that is not a string"),
        pytest.param({**HEADER, "alg": "Ed25519"}, id="alg Ed25519 (RFC 9864), not ours"),
        pytest.param({**HEADER, "typ": "JWT"}, id="typ JWT"),
    ],
)
def test_a_header_that_is_not_ours_is_refused_even_when_signed_by_our_key(header):
    with pytest.raises(TokenInvalid):
        verify(_signed(header=header))


def test_a_header_without_kid_names_no_key_we_know():
    kidless = {"alg": "EdDSA", "typ": TOKEN_TYPE}
    with pytest.raises(TokenUnknownKey):
        verify(_signed(header=kidless))
    # Not even a key someone named "None".
    with pytest.raises(TokenUnknownKey):
        verify(_signed(header=kidless), public_keys={"None": KEY.public_key})


def test_an_unknown_header_that_is_not_critical_is_ignored():
    assert verify(_signed(header={**HEADER, "x-trace": "abc"})).ticket == GRANT.ticket


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(_claims(exp="1795865400"), id="exp as a string"),
        pytest.param(_claims(exp=1795865400.5), id="exp as a float"),
        pytest.param(_claims(nbf=True), id="nbf as a boolean"),
        pytest.param(_claims(exp=253_402_300_800), id="exp in the year 10000"),
        pytest.param(_claims(iat=-1), id="iat before 1970"),
        pytest.param(_claims(iat=None), id="iat null"),
        pytest.param(_claims(sub=10000000001), id="sub as a number"),
        pytest.param(_claims(jti=["a"]), id="jti as a list"),
        pytest.param(_claims(purpose={"avis": True}), id="purpose as an object"),
        pytest.param(_claims(ticket=42), id="ticket as a number"),
        pytest.param(_claims(iss=[ISSUER]), id="iss as a list"),
        pytest.param(_claims(aud=["https://other.example/"]), id="aud a list without ours"),
        pytest.param(_claims(aud=[GATEWAY, 7]), id="aud a list with a number"),
        pytest.param(_claims(aud={"aud": GATEWAY}), id="aud an object"),
        pytest.param(_claims(aud=[]), id="aud empty"),
        pytest.param(_claims(studies=[]), id="no studies"),
        pytest.param(_claims(studies="1.2.3.1"), id="studies as a string"),
        pytest.param(_claims(studies=["1.2.3.1", 2]), id="a study that is a number"),
        pytest.param(
            json.dumps(_claims()).encode()[:-1] + b', "exp": NaN}', id="exp NaN, given twice"
        ),
        pytest.param(
            json.dumps(_claims(aud="https://other.example/")).encode()[:-1]
            + f', "aud": "{GATEWAY}"}}'.encode(),
            id="aud given twice, ours last",
        ),
        pytest.param(
            json.dumps(_claims()).encode()[:-1] + b', "studies": ["6.6.6"]}',
            id="studies given twice",
        ),
        pytest.param(
            json.dumps(_claims(exp=None)).encode().replace(b"null", b"9" * 5000),
            id="exp of 5,000 digits",
        ),
        pytest.param(b"[]", id="a JSON array"),
        pytest.param(b'{"iss": "' + b"9" * 5000 + b'"', id="truncated JSON"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="nested too deep"),
    ],
)
def test_claims_of_the_wrong_shape_are_refused_even_when_signed_by_our_key(payload):
    with pytest.raises(TokenInvalid):
        verify(_signed(payload=payload))


def test_issued_at_is_not_in_the_future_of_the_given_time():
    future = int((NOW + dt.timedelta(minutes=1)).timestamp())
    token = _signed(payload=_claims(iat=future))
    with pytest.raises(TokenNotYetValid):
        verify(token)
    assert verify(token, now=NOW + dt.timedelta(minutes=1)).issued_at == NOW + dt.timedelta(
        minutes=1
    )


@settings(max_examples=300, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=1000),
    replacement=st.text(alphabet="AQgwBz09-_.=+/ é\n\x00", max_size=3),
    cut=st.booleans(),
)
def test_a_changed_character_only_ever_gives_a_token_error(position, replacement, cut):
    token, claims = issue()
    position %= len(token)
    changed = token[:position] + replacement + token[position + (0 if cut else 1) :]
    try:
        verified = verify(changed)
    except (TokenInvalid, TokenUnknownKey):
        return
    assert changed == token
    assert verified == claims


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300) | st.from_regex(r"[A-Za-z0-9_-]{0,80}(\.[A-Za-z0-9_-]{0,120}){2,3}"))
def test_arbitrary_text_only_ever_gives_a_token_error(text):
    with pytest.raises((TokenInvalid, TokenUnknownKey)):
        verify(text)
