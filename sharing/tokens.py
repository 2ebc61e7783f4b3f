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
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

TOKEN_TYPE = "relais-retrieval+jwt"  # noqa: S105 - the JWT "typ", not a secret
ALGORITHM = "EdDSA"
DEFAULT_LIFETIME = dt.timedelta(minutes=15)
_REQUIRED = ["iss", "aud", "sub", "jti", "iat", "nbf", "exp", "studies", "purpose", "ticket"]


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
    """The claims of a valid token; raises a `TokenError` for anything else."""
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise TokenInvalid(f"not a JWT: {exc}") from exc
    if header.get("typ") != TOKEN_TYPE or header.get("alg") != ALGORITHM:
        raise TokenInvalid("not a Relais retrieval token (typ or alg)")
    key = public_keys.get(str(header.get("kid")))
    if key is None:
        raise TokenUnknownKey(f"unknown signing key {header.get('kid')!r}")
    try:
        payload: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[ALGORITHM],
            audience=audience,
            issuer=issuer,
            leeway=leeway,
            options={"require": _REQUIRED, "verify_exp": False, "verify_nbf": False},
        )
    except jwt.PyJWTError as exc:
        raise TokenInvalid(str(exc)) from exc
    # Time is checked here, against the caller's `now` (PyJWT would read the clock).
    moment = now.timestamp()
    if moment + leeway.total_seconds() < payload["nbf"]:
        raise TokenNotYetValid("the token is not valid yet")
    if moment - leeway.total_seconds() >= payload["exp"]:
        raise TokenExpired("the token has expired")
    studies = payload["studies"]
    if not isinstance(studies, list) or not studies or not all(isinstance(s, str) for s in studies):
        raise TokenInvalid("the token's studies are not a list of UIDs")
    return Claims(
        issuer=payload["iss"],
        audience=audience,
        subject=str(payload["sub"]),
        token_id=str(payload["jti"]),
        issued_at=_time(payload["iat"]),
        not_before=_time(payload["nbf"]),
        expires_at=_time(payload["exp"]),
        studies=tuple(studies),
        purpose=str(payload["purpose"]),
        ticket=str(payload["ticket"]),
    )


def token_hash(token: str) -> str:
    """What the audit and the revocation list keep of a token: its SHA-256."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


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
