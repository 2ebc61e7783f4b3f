"""C-FIND attribute matching (PS3.4 C.2.2.2), for the answers the broker builds itself.

`matches(value, pattern, vr)` tells whether an attribute's value matches a query key:

- universal matching: an empty key (or "*") matches anything, an empty value included;
- list of UID matching (UI): the value is one of the backslash-separated UIDs;
- range matching (DA, TM, DT): "A-B", "A-" or "-B", bounds included; a single value is
  matched as it is; an empty value matches no range;
- wildcard matching: "*" any run of characters, "?" one character; person names (PN) match
  without regard to case, as Orthanc and most archives do;
- single value matching otherwise (exact; PN without regard to case).

A multi-valued attribute (Modalities in Study) matches when one of its values does, and a
multi-valued key (``CT\\MR``) when one of its values matches.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

_RANGE_VRS = frozenset({"DA", "TM", "DT"})


def matches(value: str | Sequence[str], pattern: str, vr: str) -> bool:
    pattern = pattern.strip() if vr != "UI" else pattern.strip("\0 ")
    if pattern in ("", "*"):
        return True
    values = [value] if isinstance(value, str) else list(value)
    if vr == "UI":
        wanted = {uid.strip() for uid in pattern.split("\\")}
        return any(item in wanted for item in values)
    keys = pattern.split("\\")
    return any(_one(str(item).strip(), key, vr) for item in values for key in keys)


def _one(value: str, key: str, vr: str) -> bool:
    if key in ("", "*"):
        return True
    if vr in _RANGE_VRS and "-" in key:
        if not value:
            return False
        low, _, high = key.partition("-")
        low, high = _normalised(low.strip(), vr), _normalised(high.strip(), vr, upper=True)
        value = _normalised(value, vr)
        return (not low or value >= low) and (not high or value <= high)
    if "*" in key or "?" in key:
        return _wildcard(key, vr == "PN").fullmatch(value) is not None
    if vr == "PN":
        return value.casefold() == key.casefold()
    if vr in _RANGE_VRS:
        return _normalised(value, vr) == _normalised(key, vr)
    return value == key


def _normalised(text: str, vr: str, *, upper: bool = False) -> str:
    """A time as a string that sorts like it: "0930" -> "093000" ("093059" as an upper bound);
    compared to the second, the fraction dropped. Dates (YYYYMMDD) sort as they are."""
    if vr != "TM" or not text:
        return text
    digits = text.split(".")[0].replace(":", "")
    filler = "005959" if upper else "000000"
    return digits + filler[len(digits) :]


@lru_cache(maxsize=256)
def _wildcard(key: str, ignore_case: bool) -> re.Pattern[str]:
    pattern = "".join(
        ".*" if char == "*" else "." if char == "?" else re.escape(char) for char in key
    )
    return re.compile(pattern, re.IGNORECASE | re.DOTALL if ignore_case else re.DOTALL)
