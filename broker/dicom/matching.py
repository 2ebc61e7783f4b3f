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

from collections.abc import Sequence

_RANGE_VRS = frozenset({"DA", "TM", "DT"})
# A key (other than a list of UIDs, matched by set lookup) longer than any DICOM value could
# be, or with more values than a query needs, is refused (`KeyTooLong`): matching stays
# cheap whatever a peer sends.
MAX_KEY_LENGTH = 1024
MAX_KEY_VALUES = 64


class KeyTooLong(ValueError):
    """A matching key too long, or with too many values, to be a sensible query."""


def matches(value: str | Sequence[str], pattern: str, vr: str) -> bool:
    if vr != "UI" and (len(pattern) > MAX_KEY_LENGTH or pattern.count("\\") >= MAX_KEY_VALUES):
        raise KeyTooLong(f"a {vr} matching key of {len(pattern)} characters is refused")
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
        return _glob(value, key, ignore_case=vr == "PN")
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


def _glob(value: str, key: str, *, ignore_case: bool) -> bool:
    """Wildcard matching in linear time ("*" any run, "?" one character): a greedy scan that
    backtracks only to the last "*", never a regular expression, whose backtracking a key
    like ``*?*?*?...!`` would make exponential (and hold the GIL meanwhile)."""
    if ignore_case:
        value, key = value.casefold(), key.casefold()
    v = k = 0
    star_k, star_v = -1, 0
    while v < len(value):
        if k < len(key) and (key[k] == "?" or key[k] == value[v]):
            v += 1
            k += 1
        elif k < len(key) and key[k] == "*":
            star_k, star_v = k, v
            k += 1
        elif star_k >= 0:
            star_v += 1
            v, k = star_v, star_k + 1
        else:
            return False
    while k < len(key) and key[k] == "*":
        k += 1
    return k == len(key)
