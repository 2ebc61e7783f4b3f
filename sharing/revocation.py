"""Checking a retrieval token where it is used: signature, time, scope, revocation.

Each process keeps a copy of the recent revocations (:class:`~sharing.models.Revocation`),
read again at most every ``RELAIS_REVOCATION_POLL_SECONDS`` (0.5 s by default), so
a revocation committed by any process is honoured everywhere within that delay, and a
token check costs a signature verification and a set lookup, not a query. Revocations
older than the longest token lifetime (plus a minute) are dropped: no token they could
stop is still valid.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from django.conf import settings

from sharing import tokens
from sharing.keystore import verification_keys
from sharing.models import Revocation

MAX_TOKEN_LIFETIME_SECONDS = 3600  # RELAIS_TOKEN_LIFETIME_SECONDS's upper bound


class TokenRevoked(tokens.TokenError):
    code = "token:revoked"


class TokenOutOfScope(tokens.TokenError):
    code = "token:out-of-scope"


@dataclass
class _Feed:
    refreshed_at: float = float("-inf")
    token_ids: dict[str, dt.datetime] = field(default_factory=dict)
    request_ids: dict[str, dt.datetime] = field(default_factory=dict)


class RevocationList:
    """This process's copy of the revocation feed (thread-safe)."""

    def __init__(
        self,
        *,
        poll_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._poll = (
            settings.RELAIS_REVOCATION_POLL_SECONDS if poll_seconds is None else poll_seconds
        )
        self._clock = clock
        self._lock = threading.Lock()
        self._feed = _Feed()

    def is_revoked(self, claims: tokens.Claims, now: dt.datetime) -> bool:
        self._refresh(now)
        feed = self._feed
        return claims.token_id in feed.token_ids or claims.ticket in feed.request_ids

    def _refresh(self, now: dt.datetime) -> None:
        if self._clock() - self._feed.refreshed_at < self._poll:
            return
        with self._lock:
            if self._clock() - self._feed.refreshed_at < self._poll:
                return
            # The whole window is read again each time (it is small): a revocation whose
            # transaction commits after a later one is not missed, as an "id > last seen"
            # reading would.
            # The longest lifetime a token may ever have had (the setting's bound), plus a
            # minute: lowering the setting does not forget revocations of older tokens.
            horizon = now - dt.timedelta(seconds=MAX_TOKEN_LIFETIME_SECONDS + 60)
            feed = _Feed()
            for token_id, request_id, at in Revocation.objects.filter(
                revoked_at__gte=horizon
            ).values_list("token_id", "request_id", "revoked_at"):
                if token_id is not None:
                    feed.token_ids[str(token_id)] = at
                if request_id is not None:
                    feed.request_ids[str(request_id)] = at
            feed.refreshed_at = self._clock()
            self._feed = feed


_revocations = RevocationList()


def revocation_list() -> RevocationList:
    return _revocations


_verified = tokens.VerifiedTokens()


def token_check(
    token: str,
    *,
    studies: Sequence[str],
    now: dt.datetime,
    revocations: RevocationList | None = None,
    verified: tokens.VerifiedTokens | None = None,
) -> tokens.Claims:
    """The claims of a token that may retrieve ``studies`` now; a `TokenError` otherwise."""
    claims = (verified or _verified).verify(
        token,
        public_keys=verification_keys(),
        issuer=settings.RELAIS_TOKEN_ISSUER,
        audience=settings.RELAIS_TOKEN_AUDIENCE,
        now=now,
    )
    if (revocations or _revocations).is_revoked(claims, now):
        raise TokenRevoked("the token was revoked")
    if not tokens.covers(claims, studies):
        raise TokenOutOfScope("a study asked for is outside the token's scope")
    return claims
