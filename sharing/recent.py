"""What the gateway looks up again for each request of a viewing, kept for a moment.

A viewer reads a study with hundreds of requests (an instance, a frame each), every one
with the same token, for the same study. Each would look up the token's ticket and holder,
the study's approved manifest and its instances: four queries whose ORM work cost this
machine more CPU than relaying a 500 KB instance (docs/performance.md). Each process keeps
them for ``RELAIS_REVOCATION_POLL_SECONDS`` from when they were read, the delay within which it
already honours a revocation committed anywhere (`sharing.revocation`). A manifest replaced
or deprecated, an identifier merged into or unlinked from a patient, an archive's settings
changed, are honoured within about the same delay: the setting, plus the time the lookup took.
What a token gives is still checked on every request: signature, time, scope and the
revocation copy. A lookup that finds no token or no manifest is not kept. 0 keeps nothing.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

from cachetools import TTLCache
from django.conf import settings

V = TypeVar("V")


class Recent(Generic[V]):
    """A bounded, thread-safe map of recent lookups, each kept for the revocation delay."""

    def __init__(self, maxsize: int, getsizeof: Callable[[V], float] | None = None) -> None:
        self._maxsize = maxsize
        self._getsizeof = getsizeof
        self._lock = threading.Lock()
        self._ttl = -1.0
        self._entries = self._new(0)

    def _new(self, ttl: float) -> TTLCache[Hashable, V]:
        return TTLCache(self._maxsize, ttl=ttl, timer=time.monotonic, getsizeof=self._getsizeof)

    def get(self, key: Hashable, load: Callable[[], V | None]) -> V | None:
        """The value kept for ``key``, or what ``load()`` gives now (kept unless None)."""
        ttl = float(settings.RELAIS_REVOCATION_POLL_SECONDS)
        if ttl <= 0:
            return load()
        with self._lock:
            if ttl != self._ttl:  # the setting changed (tests): start afresh
                self._entries = self._new(ttl)
                self._ttl = ttl
            value = self._entries.get(key)
        if value is not None:
            return value
        value = load()
        if value is not None:
            with self._lock, contextlib.suppress(ValueError):  # larger than the whole map
                self._entries[key] = value
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_all: list[Recent[object]] = []


def recent(maxsize: int, getsizeof: Callable[[V], float] | None = None) -> Recent[V]:
    """A new map of this process, emptied by `recent_clear`: ``maxsize`` entries, or of that
    total size as ``getsizeof`` measures each."""
    lookups: Recent[V] = Recent(maxsize, getsizeof)
    _all.append(lookups)  # type: ignore[arg-type]
    return lookups


def recent_clear() -> None:
    """Forget every kept lookup of this process (tests: the database was rolled back)."""
    for lookups in _all:
        lookups.clear()
