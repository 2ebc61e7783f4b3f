"""Retrieval tokens: signed, typed, short-lived JWTs (pure: no ORM, no clock).

A token is an EdDSA (Ed25519) JWT whose header carries ``kid`` (which key signed it) and
``typ`` (``relais-retrieval+jwt``, RFC 8725 explicit typing, so that no other JWT of the
region can pass for one). Its claims: ``iss``, ``aud`` (the gateway), ``sub`` (who may
retrieve), ``jti``, ``iat``, ``nbf``, ``exp``, and Relais's own: ``studies`` (the Study
Instance UIDs in scope), ``purpose`` and ``ticket`` (the access request it came from).

Its lifetime is the default (15 minutes) or less: never beyond the grant, the duty shift or
the emergency window it comes from (``not_after``). Tokens are never logged: the audit keeps
`token_hash`.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import re
import threading
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TOKEN_TYPE = "relais-retrieval+jwt"  # noqa: S105 - the JWT "typ", not a secret
ALGORITHM = "EdDSA"
DEFAULT_LIFETIME = dt.timedelta(minutes=15)
_REQUIRED = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp", "studies", "purpose", "ticket"]
_STRINGS = ["iss", "sub", "jti", "purpose", "ticket"]
_TIMES = ["iat", "nbf", "exp"]
# A compact JWS: three non-empty base64url segments, no padding, nothing else (RFC 7515 §7.1).
_COMPACT_JWS = re.compile(r"([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)\.([A-Za-z0-9_-]+)")
_SIGNATURE_LENGTH = 64  # Ed25519 (RFC 8032 §5.1.6)
_LAST_TIME = 253_402_300_799  # 9999-12-31T23:59:59Z, the last second a datetime holds


class TokenError(Exception):
    """A token that cannot be honoured; `code` is stable."""

    code = "token:invalid"


class TokenInvalid(TokenError):
    code = "token:invalid"


class TokenExpired(TokenError):
    code = "token:expired"


class TokenNotYetValid(TokenError):
    code = "token:not-yet-valid"


class TokenUnknownKey(TokenError):
    code = "token:unknown-key"


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: Ed25519PrivateKey

    @classmethod
    def from_pem(cls, kid: str, pem: bytes) -> SigningKey:
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"key {kid} is not an Ed25519 private key")
        return cls(kid, key)

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()


@dataclass(frozen=True)
class Grant:
    """What a token allows: who, which studies, for what, from which ticket, until when."""

    subject: str
    studies: tuple[str, ...]
    purpose: str
    ticket: str
    not_after: dt.datetime  # the grant's, the shift's or the emergency window's end


@dataclass(frozen=True)
class Claims:
    issuer: str
    audience: str
    subject: str
    token_id: str
    issued_at: dt.datetime
    not_before: dt.datetime
    expires_at: dt.datetime
    studies: tuple[str, ...]
    purpose: str
    ticket: str
    key_id: str = ""  # the kid that signed it


def token_issue(
    *,
    key: SigningKey,
    grant: Grant,
    issuer: str,
    audience: str,
    now: dt.datetime,
    lifetime: dt.timedelta = DEFAULT_LIFETIME,
) -> tuple[str, Claims]:
    """A signed token for ``grant``, valid from ``now`` for ``lifetime`` at most."""
    if now.tzinfo is None or grant.not_after.tzinfo is None:
        raise ValueError("token times must be timezone-aware")
    if not grant.studies:
        raise ValueError("a token covers at least one study")
    if lifetime <= dt.timedelta(0):
        raise ValueError("a token's lifetime is positive")
    issued = now.replace(microsecond=0)
    expires = min(issued + lifetime, grant.not_after)
    if expires <= issued:
        raise ValueError("the grant has ended: no token")
    claims = Claims(
        issuer=issuer,
        audience=audience,
        subject=grant.subject,
        token_id=str(uuid.uuid4()),
        issued_at=issued,
        not_before=issued,
        expires_at=expires,
        studies=tuple(grant.studies),
        purpose=grant.purpose,
        ticket=grant.ticket,
        key_id=key.kid,
    )
    payload = {
        "iss": issuer,
        "aud": audience,
        "sub": claims.subject,
        "jti": claims.token_id,
        "iat": int(issued.timestamp()),
        "nbf": int(issued.timestamp()),
        "exp": int(expires.timestamp()),
        "studies": list(claims.studies),
        "purpose": claims.purpose,
        "ticket": claims.ticket,
    }
    token = jwt.encode(
        payload,
        key.private_key,
        algorithm=ALGORITHM,
        headers={"kid": key.kid, "typ": TOKEN_TYPE},
    )
    return token, claims


def token_verify(
    token: str,
    *,
    public_keys: Mapping[str, Ed25519PublicKey],
    issuer: str,
    audience: str,
    now: dt.datetime,
    leeway: dt.timedelta = dt.timedelta(seconds=0),
) -> Claims:
    """The claims of a valid token; raises a `TokenError` for anything else.

    Read here, not by PyJWT: PyJWT checks the base64url alphabet one character at a time in
    Python, and reading the header first made it read the whole token twice, which held
    verification to 0.4 of the Ed25519 rate (docs/performance.md). Stricter than PyJWT:
    exactly three unpadded, canonical base64url segments; UTF-8 JSON objects whose members
    appear once; no ``crit`` (nor ``b64``) header; ``iat``, ``nbf`` and ``exp`` integers,
    ``iat`` not after ``now`` either; ``iss``, ``sub``, ``jti``, ``purpose``, ``ticket``
    strings. PyJWT still issues the tokens.
    """
    parts = _COMPACT_JWS.fullmatch(token) if isinstance(token, str) else None
    if parts is None:
        raise TokenInvalid("not a JWT: three base64url segments without padding")
    header = _json_object(_b64url_decode(parts[1]), "header")
    if header.get("typ") != TOKEN_TYPE or header.get("alg") != ALGORITHM:
        raise TokenInvalid("not a Relais retrieval token (typ or alg)")
    if "crit" in header or header.get("b64", True) is not True:
        raise TokenInvalid("critical header extensions are not supported")
    kid = header.get("kid")
    if kid is None:
        raise TokenUnknownKey("the token names no signing key (kid)")
    if not isinstance(kid, str):
        raise TokenInvalid("the key ID (kid) is not a string")
    key = public_keys.get(kid)
    if key is None:
        raise TokenUnknownKey(f"unknown signing key {kid!r}")
    signature = _b64url_decode(parts[3])
    if len(signature) != _SIGNATURE_LENGTH:
        raise TokenInvalid("Signature verification failed")
    try:
        key.verify(signature, token[: parts.end(2)].encode("ascii"))
    except InvalidSignature as exc:
        raise TokenInvalid("Signature verification failed") from exc
    payload = _json_object(_b64url_decode(parts[2]), "payload")
    for name in _REQUIRED:
        if payload.get(name) is None:
            raise TokenInvalid(f'Token is missing the "{name}" claim')
    for name in _STRINGS:
        if not isinstance(payload[name], str):
            raise TokenInvalid(f'the "{name}" claim is not a string')
    for name in _TIMES:
        value = payload[name]
        if type(value) is not int or not 0 <= value <= _LAST_TIME:  # a bool is not a time
            raise TokenInvalid(f'the "{name}" claim is not a time in seconds')
    if payload["iss"] != issuer:
        raise TokenInvalid("Invalid issuer")
    audiences = payload["aud"]
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list) or not all(isinstance(a, str) for a in audiences):
        raise TokenInvalid("Invalid claim format in token (aud)")
    if audience not in audiences:
        raise TokenInvalid("Audience doesn't match")
    # Time is checked against the caller's `now`, never the clock.
    moment = now.timestamp()
    slack = leeway.total_seconds()
    if moment + slack < payload["nbf"] or moment + slack < payload["iat"]:
        raise TokenNotYetValid("the token is not valid yet")
    if moment - slack >= payload["exp"]:
        raise TokenExpired("the token has expired")
    studies = payload["studies"]
    if not isinstance(studies, list) or not studies or not all(isinstance(s, str) for s in studies):
        raise TokenInvalid("the token's studies are not a list of UIDs")
    return Claims(
        issuer=payload["iss"],
        audience=audience,
        subject=payload["sub"],
        token_id=payload["jti"],
        issued_at=_time(payload["iat"]),
        not_before=_time(payload["nbf"]),
        expires_at=_time(payload["exp"]),
        studies=tuple(studies),
        purpose=payload["purpose"],
        ticket=payload["ticket"],
        key_id=kid,
    )


class VerifiedTokens:
    """Tokens already verified, by their exact text, with their claims (bounded, LRU).

    A viewer presents one token for every request of a study, and the signature of a given
    text never changes: a hit skips the Ed25519 verification, nothing else. It still passes
    the time checks against ``now``, its key must still be among ``public_keys`` (a key
    retired past its grace drops its tokens), and issuer and audience must be those asked.
    """

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._claims: OrderedDict[str, Claims] = OrderedDict()

    def verify(
        self,
        token: str,
        *,
        public_keys: Mapping[str, Ed25519PublicKey],
        issuer: str,
        audience: str,
        now: dt.datetime,
    ) -> Claims:
        with self._lock:
            claims = self._claims.get(token)
            if claims is not None:
                self._claims.move_to_end(token)
        if (
            claims is not None
            and claims.key_id in public_keys
            and claims.issuer == issuer
            and claims.audience == audience
        ):
            if now < claims.not_before or now < claims.issued_at:
                raise TokenNotYetValid("the token is not valid yet")
            if now >= claims.expires_at:
                raise TokenExpired("the token has expired")
            return claims
        claims = token_verify(
            token, public_keys=public_keys, issuer=issuer, audience=audience, now=now
        )
        with self._lock:
            self._claims[token] = claims
            while len(self._claims) > self._size:
                self._claims.popitem(last=False)
        return claims


def token_hash(token: str) -> str:
    """What the audit and the revocation list keep of a token: its SHA-256 (of whatever was
    presented, even text that is not a token)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def jwks(public_keys: Mapping[str, Ed25519PublicKey]) -> dict[str, list[dict[str, str]]]:
    """The public keys as a JSON Web Key Set (RFC 7517, OKP keys of RFC 8037)."""
    return {
        "keys": [
            {
                "kty": "OKP",
                "crv": "Ed25519",
                "kid": kid,
                "use": "sig",
                "alg": ALGORITHM,
                "x": _b64url(
                    key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                ),
            }
            for kid, key in sorted(public_keys.items())
        ]
    }


def covers(claims: Claims, study_instance_uids: Sequence[str]) -> bool:
    """Whether every study asked for is in the token's scope."""
    return set(study_instance_uids) <= set(claims.studies)


def _time(value: Any) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(value), tz=dt.UTC)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(segment: str) -> bytes:
    """A segment already matched by `_COMPACT_JWS`, decoded; only its canonical form is valid."""
    if len(segment) % 4 == 1:
        raise TokenInvalid("not a JWT: a segment is not base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if _b64url(raw) != segment:  # stray low bits in the last character: a second spelling
        raise TokenInvalid("not a JWT: a segment is not canonical base64url")
    return raw


def _json_object(raw: bytes, part: str) -> dict[str, Any]:
    """A JSON object in UTF-8, every member once (RFC 7515 §4, RFC 7519 §4), no NaN."""
    try:
        value = _JSON.decode(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise TokenInvalid(f"not a JWT: the {part} is not JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise TokenInvalid(f"not a JWT: the {part} is not a JSON object")
    return value


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("a member is repeated")
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


_JSON = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)
