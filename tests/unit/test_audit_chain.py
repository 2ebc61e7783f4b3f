"""The audit chain's canonical form and hash: pure, no database."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from dataclasses import dataclass
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from audit.chain import (
    GENESIS_HASH,
    CanonicalError,
    ChainBreak,
    ChainChecker,
    canonical_json,
    compute_hash,
    format_time,
    json_value,
)
from audit.events import Outcome

PARIS = ZoneInfo("Europe/Paris")


def record(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "sequence": 7,
        "recorded_at": dt.datetime(2025, 3, 30, 1, 59, 59, 999999, tzinfo=dt.UTC),
        "code": "registry:manifest:read",
        "event_id": "110110",
        "event_type": "",
        "action": "R",
        "outcome": 0,
        "actor_kind": "user",
        "actor_user_id": 42,
        "actor_username": "dr.lefèvre",
        "actor_institution": "330781196",
        "actor_role": "radiologist",
        "actor_address": "10.0.0.7",
        "patient_id": "3f1c2a4e-0d52-4c83-9d1e-3d1f6b7e2a10",
        "patient_identifiers": [{"issuer": "1.2.250.1.71.4.2.7", "value": "IPP001", "kind": "ipp"}],
        "participant_objects": [{"type": "study", "uid": "1.2.3.4", "instances": 412}],
        "purpose_of_use": "treatment",
        "correlation_id": uuid.UUID("2b8e7c8e-4f7a-4d64-9a57-1f0d3c0b4b1e"),
        "details": {"manifest": "1.2.3.4.5", "nested": {"b": [1, 2], "a": None}},
    }
    base.update(changes)
    return base


def reversed_keys(value: object) -> object:
    """The same JSON with every mapping's keys in the opposite order (as jsonb may give)."""
    if isinstance(value, dict):
        return {key: reversed_keys(value[key]) for key in reversed(list(value))}
    if isinstance(value, list):
        return [reversed_keys(item) for item in value]
    return value


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=12)
json_documents = st.recursive(
    st.none() | st.booleans() | st.integers() | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=25,
)


def test_canonical_json_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": {"d": [1, "é"], "c": None}}) == (
        '{"a":{"c":null,"d":[1,"é"]},"b":1}'.encode()
    )


def test_non_ascii_text_is_written_as_utf8_not_as_escapes() -> None:
    assert canonical_json({"name": "Éloïse Ŀ 日本 🩻"}) == '{"name":"Éloïse Ŀ 日本 🩻"}'.encode()


@given(json_documents)
def test_canonical_json_does_not_depend_on_key_order(document: object) -> None:
    assert canonical_json({"v": reversed_keys(document)}) == canonical_json({"v": document})


@given(json_documents)
def test_what_is_read_back_from_json_hashes_like_what_was_written(document: object) -> None:
    stored = json.loads(json.dumps(json_value(document)))  # a database's round trip
    assert canonical_json({"v": reversed_keys(stored)}) == canonical_json({"v": document})
    assert json_value(stored) == json_value(document)


def test_times_are_utc_iso_8601_with_microseconds() -> None:
    paris_noon = dt.datetime(2025, 7, 14, 12, 0, tzinfo=PARIS)
    assert format_time(paris_noon) == "2025-07-14T10:00:00.000000Z"
    assert canonical_json({"at": paris_noon}) == b'{"at":"2025-07-14T10:00:00.000000Z"}'


def test_the_same_instant_in_two_time_zones_hashes_the_same() -> None:
    in_paris = dt.datetime(2025, 1, 31, 9, 5, 0, 123, tzinfo=PARIS)
    assert compute_hash(GENESIS_HASH, record(recorded_at=in_paris)) == compute_hash(
        GENESIS_HASH, record(recorded_at=in_paris.astimezone(dt.UTC))
    )


def test_a_naive_time_is_refused() -> None:
    with pytest.raises(CanonicalError, match="naive"):
        canonical_json({"at": dt.datetime(2025, 1, 1, 12, 0)})


def test_floats_and_decimals_are_hashed_as_their_exact_text() -> None:
    assert json_value({"ratio": 0.1, "dose": Decimal("1.50")}) == {"ratio": "0.1", "dose": "1.50"}


@pytest.mark.parametrize("value", [float("nan"), float("inf"), Decimal("NaN")])
def test_non_finite_numbers_are_refused(value: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_json({"x": value})


def test_enums_uuids_dates_and_tuples_become_plain_json() -> None:
    assert json_value(
        {
            "outcome": Outcome.MINOR_FAILURE,
            "id": uuid.UUID(int=1),
            "day": dt.date(2025, 2, 3),
            "pair": (1, "a"),
        }
    ) == {
        "outcome": 4,
        "id": "00000000-0000-0000-0000-000000000001",
        "day": "2025-02-03",
        "pair": [1, "a"],
    }


@pytest.mark.parametrize(
    "value",
    [{1, 2}, b"bytes", {1: "not a string key"}, object(), "NUL\x00inside", "lone \ud800"],
    ids=["set", "bytes", "int key", "object", "NUL", "surrogate"],
)
def test_values_that_do_not_survive_a_database_are_refused(value: object) -> None:
    with pytest.raises(CanonicalError):
        canonical_json({"x": value})


def test_the_hash_is_sha256_of_the_canonical_form_with_prev_hash() -> None:
    prev = "ab" * 32
    expected = hashlib.sha256(canonical_json({**record(), "prev_hash": prev})).hexdigest()
    assert compute_hash(prev, record()) == expected
    assert len(expected) == 64


def test_the_genesis_prev_hash_is_64_zeros() -> None:
    assert GENESIS_HASH == "0" * 64


def test_the_hash_is_stable() -> None:
    assert compute_hash(GENESIS_HASH, record()) == compute_hash(GENESIS_HASH, record())


@pytest.mark.parametrize(
    ("field", "other"),
    [
        ("sequence", 8),
        ("recorded_at", dt.datetime(2025, 3, 30, 1, 59, 59, 999998, tzinfo=dt.UTC)),
        ("code", "registry:manifest:query"),
        ("event_id", "110112"),
        ("event_type", "110127"),
        ("action", "E"),
        ("outcome", 4),
        ("actor_kind", "system"),
        ("actor_user_id", 43),
        ("actor_username", "dr.lefevre"),
        ("actor_institution", "330781197"),
        ("actor_role", ""),
        ("actor_address", "10.0.0.8"),
        ("patient_id", "another"),
        ("patient_identifiers", []),
        ("participant_objects", [{"type": "study", "uid": "1.2.3.4", "instances": 411}]),
        ("purpose_of_use", "emergency"),
        ("correlation_id", None),
        ("details", {"manifest": "1.2.3.4.5", "nested": {"b": [2, 1], "a": None}}),
    ],
)
def test_the_hash_changes_when_any_field_changes(field: str, other: object) -> None:
    assert compute_hash(GENESIS_HASH, record(**{field: other})) != compute_hash(
        GENESIS_HASH, record()
    )


def test_the_hash_changes_with_the_previous_hash() -> None:
    assert compute_hash("1" * 64, record()) != compute_hash(GENESIS_HASH, record())


def test_a_bad_previous_hash_is_refused() -> None:
    with pytest.raises(CanonicalError, match="prev_hash"):
        compute_hash("AB" * 32, record())


def test_a_record_must_not_carry_its_own_hashes() -> None:
    with pytest.raises(CanonicalError):
        compute_hash(GENESIS_HASH, record(hash=GENESIS_HASH))


def test_a_record_must_carry_its_sequence() -> None:
    without = record()
    del without["sequence"]
    with pytest.raises(CanonicalError, match="sequence"):
        compute_hash(GENESIS_HASH, without)


@dataclass
class Row:
    sequence: int
    prev_hash: str
    hash: str
    record: dict[str, object]


def chained(count: int) -> list[Row]:
    rows = []
    prev = GENESIS_HASH
    for sequence in range(1, count + 1):
        content = record(sequence=sequence, details={"n": sequence})
        digest = compute_hash(prev, content)
        rows.append(Row(sequence, prev, digest, content))
        prev = digest
    return rows


def first_break(rows: list[Row], checker: ChainChecker | None = None) -> ChainBreak | None:
    checker = checker or ChainChecker()
    for row in rows:
        found = checker.check(
            sequence=row.sequence, prev_hash=row.prev_hash, hash=row.hash, record=row.record
        )
        if found is not None:
            return found
    return None


def test_an_untouched_chain_checks() -> None:
    rows = chained(4)
    checker = ChainChecker()
    assert first_break(rows, checker) is None
    assert (checker.checked, checker.last_sequence, checker.head_hash) == (4, 4, rows[-1].hash)


def test_a_missing_event_is_the_first_break() -> None:
    rows = chained(4)
    del rows[1]
    found = first_break(rows)
    assert found is not None
    assert found.sequence == 2
    assert "sequence 2 is missing" in found.problem


def test_an_edited_event_breaks_on_its_hash() -> None:
    rows = chained(4)
    rows[2].record = record(sequence=3, details={"n": 333})
    found = first_break(rows)
    assert found is not None
    assert found.sequence == 3
    assert "hash does not match" in found.problem


def test_swapped_events_break_on_the_link() -> None:
    rows = chained(4)
    rows[1], rows[2] = rows[2], rows[1]
    rows[1].sequence, rows[2].sequence = 2, 3
    found = first_break(rows)
    assert found is not None
    assert found.sequence == 2
    assert "does not link to sequence 1" in found.problem


def test_an_edited_event_with_a_recomputed_hash_breaks_the_next_link() -> None:
    rows = chained(4)
    rows[1].record = record(sequence=2, details={"n": 222})
    rows[1].hash = compute_hash(rows[1].prev_hash, rows[1].record)
    found = first_break(rows)
    assert found is not None
    assert found.sequence == 3
    assert "does not link" in found.problem


def test_a_check_can_start_from_an_anchor() -> None:
    rows = chained(5)
    checker = ChainChecker(first_sequence=3, anchor_hash=rows[1].hash)
    assert first_break(rows[2:], checker) is None
    assert checker.checked == 3
