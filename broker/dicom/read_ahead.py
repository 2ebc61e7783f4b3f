"""Fetch the next instances from the source archive while the current one is being sent.

A relay that reads an instance from the archive, then sends it, then waits for the
destination's answer, leaves each side idle half the time. `ReadAhead` runs the archive's
iterator in a thread of its own, a bounded number of bytes ahead of the consumer: reading the
archive's socket and sending to the destination overlap (both release the GIL while in the
kernel), and the archive's first answer is on its way while the relay still sets up the
other side. Memory stays bounded: at most `max_bytes` queued (a single larger instance alone),
plus the instance the thread holds while it waits for room.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

READ_AHEAD_BYTES = 8 * 1024 * 1024

_END = object()


class ReadAhead:
    """The items of `source`, in order, read by a thread started at once, up to `max_bytes`
    ahead of the consumer.

    An exception of `source` is raised where its item would have come. `close` (also when the
    consumer stops early) makes the thread stop after the item it is reading and close
    `source` itself (a generator is closed by the thread that runs it); the thread is a
    daemon, so that a source stalled in a read (bounded by its own timeout) holds nothing up.
    """

    def __init__(
        self,
        source: Iterable[bytes],
        *,
        max_bytes: int = READ_AHEAD_BYTES,
        name: str = "read-ahead",
    ) -> None:
        self.max_bytes = max_bytes
        self._items: deque[Any] = deque()
        self._buffered = 0
        self._stopped = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(
            target=self._produce, args=(iter(source),), name=name, daemon=True
        )
        self._thread.start()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        with self._changed:
            while not self._items:
                if self._stopped:
                    raise StopIteration
                self._changed.wait()
            item = self._items.popleft()
            if item is _END:
                self._stopped = True
                raise StopIteration
            if isinstance(item, BaseException):
                self._stopped = True
                raise item
            self._buffered -= len(item)
            self._changed.notify_all()
            return item

    def close(self) -> None:
        with self._changed:
            self._stopped = True
            self._items.clear()
            self._buffered = 0
            self._changed.notify_all()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _produce(self, iterator: Iterator[bytes]) -> None:
        try:
            for item in iterator:
                with self._changed:
                    while (
                        self._items
                        and self._buffered + len(item) > self.max_bytes
                        and not self._stopped
                    ):
                        self._changed.wait()
                    if self._stopped:
                        return
                    self._items.append(item)
                    self._buffered += len(item)
                    self._changed.notify_all()
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(exc)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    logger.exception("closing the source of %s failed", self._thread.name)

    def _put(self, item: object) -> None:
        with self._changed:
            if not self._stopped:
                self._items.append(item)
                self._changed.notify_all()
