"""C-FIND attribute matching (PS3.4 C.2.2.2)."""

from __future__ import annotations

import pytest

from broker.dicom.matching import KeyTooLong, matches


@pytest.mark.parametrize(
    ("value", "pattern", "vr", "expected"),
    [
        # universal matching, an empty value included
        ("DUPONT^JEAN", "", "PN", True),
        ("", "*", "LO", True),
        # single value
        ("CHU0012345", "CHU0012345", "LO", True),
        ("CHU0012345", "CHU001234", "LO", False),
        ("chu0012345", "CHU0012345", "LO", False),
        # wildcards; person names without regard to case
        ("DUPONT^JEAN", "DUP*", "PN", True),
        ("Dupont^Jean", "dupont^*", "PN", True),
        ("DUPONT^JEAN", "D?PONT^JEAN", "PN", True),
        ("DUPONT^JEAN", "MARTIN*", "PN", False),
        ("CT 3.5 [abdomen]", "CT 3.5 [*", "LO", True),  # regex characters are literal
        ("CT 3x5", "CT 3.5*", "LO", False),
        ("DUPONT^JEAN", "DUPONT^JEAN", "PN", True),
        ("dupont^jean", "DUPONT^JEAN", "PN", True),
        # list of UIDs
        ("1.2.3", "1.2.4\\1.2.3", "UI", True),
        ("1.2.3", "1.2.3.4", "UI", False),
        ("1.2.3", "1.2.*", "UI", False),  # no wildcard on UIDs
        # date ranges, bounds included; an empty date matches no range
        ("20240115", "20240101-20240131", "DA", True),
        ("20240131", "20240101-20240131", "DA", True),
        ("20240201", "20240101-20240131", "DA", False),
        ("20240201", "20240101-", "DA", True),
        ("20231231", "-20240101", "DA", True),
        ("", "20240101-20240131", "DA", False),
        ("20240115", "20240115", "DA", True),
        # time ranges, compared to the second
        ("093015", "0930-0931", "TM", True),
        ("093159", "0930-0931", "TM", True),
        ("093200", "0930-0931", "TM", False),
        ("093015.123", "093015", "TM", True),
        # multi-valued attributes and keys
        (["CT", "SR"], "CT", "CS", True),
        (["MR", "SR"], "CT", "CS", False),
        (["MR"], "CT\\MR", "CS", True),
        ([], "CT", "CS", False),
    ],
)
def test_matching(value: str | list[str], pattern: str, vr: str, expected: bool) -> None:
    assert matches(value, pattern, vr) is expected


def test_wildcards_cost_linear_time_whatever_the_key() -> None:
    """A regular expression would backtrack exponentially on this key (about 30 s at 12
    pairs), holding the GIL: every association of the broker would stall."""
    import time

    started = time.perf_counter()
    for pairs in range(6, 200, 20):
        assert not matches("SCANNER THORACO-ABDOMINO-PELVIEN INJ", "*?" * pairs + "*!", "LO")
    assert time.perf_counter() - started < 1.0
    assert matches("SCANNER THORACO-ABDOMINO-PELVIEN INJ", "*?*?*THORAC*INJ", "LO")


def test_an_absurd_key_is_refused() -> None:
    with pytest.raises(KeyTooLong):
        matches("DUPONT", "*" * 2000, "PN")
    with pytest.raises(KeyTooLong):
        matches("CT", "\\".join(["CT"] * 100), "CS")
    assert matches("1.2.3", "\\".join(f"1.2.{n}" for n in range(5000)), "UI")
