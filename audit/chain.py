"""The audit hash chain: canonical serialisation, hashing and verification. Pure: no Django.

Every audit event is hashed over a canonical serialisation of all its columns (the
sequence and the previous event's hash included), so that an edited, deleted or
reordered row breaks the chain at that row.

The canonical form is deterministic JSON: keys sorted at every level, no whitespace,
UTF-8 (no ASCII escaping), times as ISO 8601 UTC with microseconds and a ``Z``. What is
hashed must be exactly what the database gives back, on SQLite and on PostgreSQL
(where ``jsonb`` reorders keys, hence the sorting), so values are first brought to
plain JSON by :func:`json_value`, which is idempotent: the service stores its output,
and hashing the stored value again gives the same bytes. Floats are not hashed as
numbers (their text form is not stable across databases and libraries): a finite
float becomes the string of its shortest round-tripping ``repr``.

The genesis event links to :data:`GENESIS_HASH`, 64 zeros.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Final, TypeAlias

JSONValue: TypeAlias = bool | int | str | list["JSONValue"] | dict[str, "JSONValue"] | None

GENESIS_HASH: Final = "0" * 64
HASH_LENGTH: Final = 64
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


class CanonicalError(ValueError):
    """A value that cannot be serialised canonically (and so cannot be audited as is)."""


def format_time(value: dt.datetime) -> str:
    """An aware datetime as ISO 8601 UTC with microseconds: ``2025-01-31T08:05:00.000000Z``."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise CanonicalError(f"naive datetime {value.isoformat()}: audit times must be aware")
    utc = value.astimezone(dt.UTC).replace(tzinfo=None)
    return utc.isoformat(timespec="microseconds") + "Z"


def _check_text(text: str) -> str:
    if "\x00" in text:
        # PostgreSQL refuses NUL in text and jsonb: refuse it on every database alike.
        raise CanonicalError("text with a NUL character cannot be audited")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise CanonicalError(f"text that is not valid Unicode: {exc.reason}") from None
    return text


def json_value(value: object) -> JSONValue:
    """``value`` as plain JSON that survives a database round trip unchanged.

    Mappings (string keys only) become dicts, lists and tuples become lists, enums their
    value, UUIDs their string, aware datetimes :func:`format_time`, dates their ISO form,
    decimals and finite floats their exact string. Anything else is refused: sets (no
    order), bytes, naive datetimes, NaN, objects.
    """
    # bool before int (bool is an int); enums before their base types.
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, enum.Enum):
        return json_value(value.value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return _check_text(str(value))
    if isinstance(value, float):
        if not math.isfinite(value):
            raise CanonicalError(f"{value!r} cannot be audited")
        return repr(value)
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise CanonicalError(f"{value!r} cannot be audited")
        return str(value)
    if isinstance(value, dt.datetime):
        return format_time(value)
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, Mapping):
        result: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise CanonicalError(f"mapping key {key!r} is not a string")
            result[_check_text(key)] = json_value(item)
        return result
    if isinstance(value, list | tuple):
        return [json_value(item) for item in value]
    raise CanonicalError(f"{type(value).__name__} cannot be audited: {value!r}")


def canonical_json(record: Mapping[str, object]) -> bytes:
    """The canonical serialisation of ``record``: the bytes that are hashed."""
    text = json.dumps(
        json_value(record),
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )
    return text.encode("utf-8")


def is_hash(value: str) -> bool:
    """Whether ``value`` is a lowercase hex SHA-256 digest."""
    return len(value) == HASH_LENGTH and set(value) <= _HEX_DIGITS


def compute_hash(prev_hash: str, record: Mapping[str, object]) -> str:
    """SHA-256 (hex) of the canonical form of ``record`` with ``prev_hash`` added.

    ``record`` holds every hashed column except ``prev_hash`` and ``hash``; it must
    include the ``sequence``.
    """
    if not is_hash(prev_hash):
        raise CanonicalError(f"prev_hash {prev_hash!r} is not a hex SHA-256 digest")
    if "prev_hash" in record or "hash" in record:
        raise CanonicalError("the record must not carry prev_hash or hash itself")
    if not isinstance(record.get("sequence"), int) or isinstance(record["sequence"], bool):
        raise CanonicalError("the record must carry its integer sequence")
    return hashlib.sha256(canonical_json({**record, "prev_hash": prev_hash})).hexdigest()


@dataclass(frozen=True)
class ChainBreak:
    """The first place where the chain does not hold, and what is wrong there."""

    sequence: int
    problem: str


class ChainChecker:
    """Checks stored events one by one, in sequence order, from a known anchor.

    Feed every event to :meth:`check` in increasing sequence order; it answers the first
    break (a missing sequence, a ``prev_hash`` that does not link to the previous event,
    a hash that does not match the content) and must not be fed further after one.
    """

    def __init__(self, *, first_sequence: int = 1, anchor_hash: str = GENESIS_HASH) -> None:
        if first_sequence < 1:
            raise ValueError("sequences start at 1")
        self.expected_sequence = first_sequence
        self.expected_prev_hash = anchor_hash
        self.checked = 0

    @property
    def last_sequence(self) -> int:
        return self.expected_sequence - 1

    @property
    def head_hash(self) -> str:
        return self.expected_prev_hash

    def check(
        self, *, sequence: int, prev_hash: str, hash: str, record: Mapping[str, object]
    ) -> ChainBreak | None:
        expected = self.expected_sequence
        if sequence != expected:
            if sequence > expected:
                missing = (
                    f"sequence {expected} is missing"
                    if sequence == expected + 1
                    else f"sequences {expected} to {sequence - 1} are missing"
                )
                return ChainBreak(expected, f"{missing} (deleted?): the next event is {sequence}")
            return ChainBreak(expected, f"found sequence {sequence} where {expected} was expected")
        if prev_hash != self.expected_prev_hash:
            before = f"sequence {sequence - 1}" if sequence > 1 else "the genesis"
            return ChainBreak(
                sequence,
                f"prev_hash does not link to {before} (rows reordered or replaced?): "
                f"{prev_hash} != {self.expected_prev_hash}",
            )
        try:
            computed = compute_hash(prev_hash, record)
        except CanonicalError as exc:
            return ChainBreak(sequence, f"content cannot be serialised: {exc}")
        if computed != hash:
            return ChainBreak(
                sequence, f"hash does not match the content (row edited?): {hash} != {computed}"
            )
        self.expected_sequence = sequence + 1
        self.expected_prev_hash = hash
        self.checked += 1
        return None
