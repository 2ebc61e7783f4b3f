"""The broker's token signing keys, from the data directory (``broker/keys.py``)."""

from __future__ import annotations

import threading
import time

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings

from broker.keys import signing_keys
from sharing.tokens import SigningKey

# Verification keys are re-read from disk when the key directory changes (a rotation by any
# process), and at least every second (a retired key's grace ends).
KEYS_TTL_SECONDS = 1.0
_cache_lock = threading.Lock()
_cache: tuple[tuple[str, int], float, dict[str, Ed25519PublicKey]] = (("", 0), float("-inf"), {})


def current_signing_key() -> SigningKey:
    """The key new tokens are signed with (read at each call: a rotation by another process
    takes effect at once)."""
    current = signing_keys(settings.DATA_DIR)[0]
    return SigningKey.from_pem(current.kid, current.path.read_bytes())


def verification_keys() -> dict[str, Ed25519PublicKey]:
    """The public keys tokens may still be signed with: the current one, and those retired
    less than a token's lifetime (plus a minute of clock skew) ago."""
    global _cache
    directory = settings.DATA_DIR / "signing-keys"
    try:
        version = (str(directory), directory.stat().st_mtime_ns)
    except FileNotFoundError:
        version = (str(directory), 0)
    cached_version, loaded_at, keys = _cache
    if cached_version == version and time.monotonic() - loaded_at < KEYS_TTL_SECONDS:
        return keys
    with _cache_lock:
        grace = settings.RELAIS_TOKEN_LIFETIME_SECONDS + 60
        now = time.time()
        keys = {
            key.kid: SigningKey.from_pem(key.kid, key.path.read_bytes()).public_key
            for key in signing_keys(settings.DATA_DIR)
            if key.retired_at is None or now - key.retired_at < grace
        }
        _cache = (version, time.monotonic(), keys)
    return keys
