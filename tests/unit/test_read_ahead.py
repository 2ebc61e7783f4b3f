"""`ReadAhead`: the source archive read by a thread of its own, a bounded way ahead."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from broker.dicom.read_ahead import ReadAhead


def wait_until(condition: object, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)


def test_items_come_in_order() -> None:
    items = [bytes([n]) * (n + 1) for n in range(50)]
    assert list(ReadAhead(iter(items), max_bytes=10)) == items


def test_the_source_is_read_before_it_is_asked_for() -> None:
    started = threading.Event()

    def source() -> Iterator[bytes]:
        started.set()
        yield b"first"

    reader = ReadAhead(source())
    assert started.wait(5)  # the fetch is under way before the first next()
    assert list(reader) == [b"first"]


def test_it_reads_no_further_ahead_than_its_bound() -> None:
    produced: list[int] = []

    def source() -> Iterator[bytes]:
        for number in range(100):
            produced.append(number)
            yield b"x" * 1000

    reader = ReadAhead(source(), max_bytes=3000)
    wait_until(lambda: len(produced) >= 4)
    time.sleep(0.05)
    assert len(produced) == 4  # three waiting, the fourth read and held until there is room
    next(reader)
    wait_until(lambda: len(produced) >= 5)
    time.sleep(0.05)
    assert len(produced) == 5
    reader.close()


def test_an_item_larger_than_the_bound_still_goes_through() -> None:
    big = b"y" * 10_000
    assert list(ReadAhead(iter([big, big]), max_bytes=100)) == [big, big]


def test_an_error_of_the_source_is_raised_where_its_item_would_have_come() -> None:
    def source() -> Iterator[bytes]:
        yield b"one"
        raise ConnectionResetError("the archive went away")

    reader = ReadAhead(source())
    assert next(reader) == b"one"
    with pytest.raises(ConnectionResetError, match="went away"):
        next(reader)
    with pytest.raises(StopIteration):
        next(reader)


def test_closing_stops_the_thread_and_closes_the_source_in_it() -> None:
    closed_in: list[str] = []

    def source() -> Iterator[bytes]:
        try:
            while True:
                yield b"z" * 100
        finally:
            closed_in.append(threading.current_thread().name)

    reader = ReadAhead(source(), max_bytes=1000, name="fetch under test")
    assert next(reader) == b"z" * 100
    reader.close()
    wait_until(lambda: closed_in)
    assert closed_in == ["fetch under test"]
    with pytest.raises(StopIteration):
        next(reader)
    assert not any(thread.name == "fetch under test" for thread in threading.enumerate())


def test_a_large_item_waits_until_the_queue_has_room_for_it() -> None:
    produced: list[int] = []

    def source() -> Iterator[bytes]:
        for number in range(10):
            produced.append(number)
            yield b"L" * 2000

    reader = ReadAhead(source(), max_bytes=3000)
    wait_until(lambda: len(produced) >= 2)
    time.sleep(0.05)
    assert len(produced) == 2  # one queued; the second held: both would pass the bound
    assert reader._buffered == 2000
    reader.close()
