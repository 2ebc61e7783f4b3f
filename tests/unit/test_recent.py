"""The gateway's kept lookups (sharing.recent): kept for the revocation delay, then again."""

from __future__ import annotations

import time

from sharing.recent import Recent, recent, recent_clear


def counting(value: object) -> tuple[list[int], object]:
    calls: list[int] = []

    def load() -> object:
        calls.append(1)
        return value

    return calls, load


def test_a_lookup_is_kept_for_the_revocation_delay_then_made_again(settings):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 0.2
    lookups: Recent[object] = Recent(8)
    calls, load = counting("manifest")
    assert lookups.get("key", load) == "manifest"
    assert lookups.get("key", load) == "manifest"
    assert len(calls) == 1
    time.sleep(0.25)
    assert lookups.get("key", load) == "manifest"
    assert len(calls) == 2


def test_nothing_found_is_not_kept(settings):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 0.5
    lookups: Recent[object] = Recent(8)
    calls, load = counting(None)
    assert lookups.get("key", load) is None
    assert lookups.get("key", load) is None
    assert len(calls) == 2


def test_no_delay_keeps_nothing(settings):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 0
    lookups: Recent[object] = Recent(8)
    calls, load = counting("manifest")
    lookups.get("key", load)
    lookups.get("key", load)
    assert len(calls) == 2


def test_bounded_and_cleared(settings):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 0.5
    lookups = recent(2)
    calls, load = counting("value")
    for key in ("a", "b", "c"):
        lookups.get(key, load)
    lookups.get("a", load)  # the oldest went to make room
    assert len(calls) == 4
    recent_clear()
    lookups.get("c", load)
    assert len(calls) == 5


def test_bounded_by_size_and_what_is_larger_than_the_whole_is_not_kept(settings):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 0.5
    lookups: Recent[tuple[str, ...]] = Recent(5, getsizeof=len)
    calls: list[str] = []

    def load(value: tuple[str, ...]):  # type: ignore[no-untyped-def]
        def loader() -> tuple[str, ...]:
            calls.append(value[0])
            return value

        return loader

    big = ("x",) * 6
    assert lookups.get("big", load(big)) == big  # answered, not kept
    assert lookups.get("big", load(big)) == big
    assert calls == ["x", "x"]
    lookups.get("a", load(("a",) * 3))
    lookups.get("b", load(("b",) * 2))
    lookups.get("a", load(("a",) * 3))
    assert calls == ["x", "x", "a", "b"]
