"""The regional consent policy: pure evaluation of a patient's directives for one access.

No ORM, no clock: the caller gives the directives in force (each at its latest version),
who asks, in what relationship to the patient, for what purpose, which studies, and
``now``. The answer says permit or deny, why (the rule, and the directives and versions
that decided), and the obligations that come with a permit (studies to leave out).

The rules (French *équipe de soins* model, DOMAIN.md):

1. Input that is unknown or contradictory denies (fail closed): a relationship that does
   not go with the purpose, a directive whose dates are reversed or whose scope does not
   suit its kind, two current versions of one directive, no study.
2. An explicit **opposition** in force that applies to the requester (global, their
   institution, or themselves) denies, whatever the relationship and the purpose,
   emergency included.
3. A **masked** study is left out for anyone outside the hospital that holds it (an
   obligation); if every study asked for is masked, deny.
4. Within the **care team** (a professional of an institution that holds the patient's
   studies, the recipient of an approved request, a teleradiologist on duty for the source
   institution), permit.
5. **Emergency** (break-the-glass) outside the care team: permit (the emergency rules of the
   sharing service — role, justification, review — apply on top).
6. Outside the care team, the region's model decides: ``opt-in`` (the default) needs a
   **consent** in force that covers the requester (all, their institution, or themselves)
   and the purpose; ``opt-out`` permits unless opposed.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Literal


class DirectiveKind(StrEnum):
    OPPOSITION = "opposition"
    CONSENT = "consent"
    MASK = "mask"


class Scope(StrEnum):
    ALL = "all"
    INSTITUTION = "institution"  # value: a FINESS number
    PROFESSIONAL = "professional"  # value: the professional's identifier (RPPS or account)
    STUDY = "study"  # value: a Study Instance UID (masking)


class Relationship(StrEnum):
    CARE_TEAM = "care_team"  # a professional of an institution holding the patient's studies
    DUTY = "duty"  # a teleradiologist on duty for the source institution
    AVIS_RECIPIENT = "avis_recipient"  # the recipient of an approved avis request
    NONE = "none"


class Purpose(StrEnum):
    TREATMENT = "treatment"
    AVIS = "avis"
    TELERADIOLOGY = "teleradiology"
    EMERGENCY = "emergency"


CARE_TEAM = frozenset({Relationship.CARE_TEAM, Relationship.DUTY, Relationship.AVIS_RECIPIENT})

# Which purposes go with which relationship; anything else is contradictory input.
PURPOSES_OF: dict[Relationship, frozenset[Purpose]] = {
    Relationship.CARE_TEAM: frozenset({Purpose.TREATMENT, Purpose.EMERGENCY}),
    Relationship.DUTY: frozenset({Purpose.TELERADIOLOGY}),
    Relationship.AVIS_RECIPIENT: frozenset({Purpose.AVIS}),
    Relationship.NONE: frozenset({Purpose.TREATMENT, Purpose.AVIS, Purpose.EMERGENCY}),
}

SCOPES_OF: dict[DirectiveKind, frozenset[Scope]] = {
    DirectiveKind.OPPOSITION: frozenset({Scope.ALL, Scope.INSTITUTION, Scope.PROFESSIONAL}),
    DirectiveKind.CONSENT: frozenset({Scope.ALL, Scope.INSTITUTION, Scope.PROFESSIONAL}),
    DirectiveKind.MASK: frozenset({Scope.STUDY}),
}


class Rule(StrEnum):
    """Stable codes of the rule that decided; never renamed nor reused."""

    INVALID_INPUT = "consent:input:invalid"
    OPPOSITION = "consent:opposition"
    ALL_MASKED = "consent:mask:all-studies"
    CARE_TEAM = "consent:care-team"
    EMERGENCY = "consent:emergency"
    CONSENT = "consent:consent"
    NO_CONSENT = "consent:consent:missing"
    OPT_OUT = "consent:opt-out"


@dataclass(frozen=True)
class Directive:
    """One directive at its latest version (a withdrawal is a version too)."""

    id: int
    version: int
    kind: DirectiveKind
    scope: Scope
    value: str = ""  # "" for Scope.ALL
    purposes: frozenset[Purpose] = frozenset()  # consent only; empty: every purpose
    valid_from: dt.datetime | None = None
    valid_until: dt.datetime | None = None  # exclusive
    withdrawn: bool = False

    def in_force(self, now: dt.datetime) -> bool:
        return (
            not self.withdrawn
            and (self.valid_from is None or self.valid_from <= now)
            and (self.valid_until is None or now < self.valid_until)
        )


@dataclass(frozen=True)
class StudyRef:
    study_instance_uid: str
    source_institution: str  # FINESS of the hospital that holds it


@dataclass(frozen=True)
class Requester:
    professional: str
    institution: str  # FINESS


@dataclass(frozen=True)
class AccessQuery:
    requester: Requester
    relationship: Relationship
    purpose: Purpose
    studies: tuple[StudyRef, ...]
    now: dt.datetime


@dataclass(frozen=True)
class PolicySettings:
    """The region's choices (settings, not code)."""

    outside_care_team: Literal["opt-in", "opt-out"] = "opt-in"


@dataclass(frozen=True)
class Reason:
    rule: Rule
    text: str
    directive_id: int | None = None
    directive_version: int | None = None


@dataclass(frozen=True)
class Obligation:
    kind: Literal["exclude-study"]
    study_instance_uid: str
    reason: Reason


@dataclass(frozen=True)
class Decision:
    permit: bool
    rule: Rule
    reasons: tuple[Reason, ...]
    obligations: tuple[Obligation, ...] = ()
    studies: tuple[str, ...] = field(default=())  # what a permit covers, obligations applied

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(o.study_instance_uid for o in self.obligations)


def evaluate(
    directives: Sequence[Directive],
    query: AccessQuery,
    settings: PolicySettings = PolicySettings(),
) -> Decision:
    """The decision of the regional policy for ``query`` (see the module docstring)."""
    problems = list(_input_problems(directives, query, settings))
    if problems:
        return _deny(Rule.INVALID_INPUT, [Reason(Rule.INVALID_INPUT, p) for p in problems])
    now, requester = query.now, query.requester
    in_force = [d for d in directives if d.in_force(now)]

    oppositions = [
        d for d in in_force if d.kind is DirectiveKind.OPPOSITION and _covers(d, requester)
    ]
    if oppositions:
        return _deny(
            Rule.OPPOSITION,
            [_because(Rule.OPPOSITION, d, f"the patient opposed {_whom(d)}") for d in oppositions],
        )

    masks = {d.value: d for d in in_force if d.kind is DirectiveKind.MASK}
    obligations = tuple(
        Obligation(
            "exclude-study",
            study.study_instance_uid,
            _because(
                Rule.ALL_MASKED,
                masks[study.study_instance_uid],
                f"study {study.study_instance_uid} is masked outside {study.source_institution}",
            ),
        )
        for study in query.studies
        if study.study_instance_uid in masks and study.source_institution != requester.institution
    )
    excluded = {o.study_instance_uid for o in obligations}
    remaining = tuple(
        s.study_instance_uid for s in query.studies if s.study_instance_uid not in excluded
    )
    if not remaining:
        return _deny(Rule.ALL_MASKED, [o.reason for o in obligations])

    if query.relationship in CARE_TEAM:
        reason = Reason(
            Rule.CARE_TEAM,
            f"care team ({query.relationship.value}) and no opposition",
        )
        return Decision(True, Rule.CARE_TEAM, (reason,), obligations, remaining)
    if query.purpose is Purpose.EMERGENCY:
        reason = Reason(Rule.EMERGENCY, "emergency access (break-the-glass) and no opposition")
        return Decision(True, Rule.EMERGENCY, (reason,), obligations, remaining)
    if settings.outside_care_team == "opt-out":
        reason = Reason(Rule.OPT_OUT, "outside the care team, the region permits unless opposed")
        return Decision(True, Rule.OPT_OUT, (reason,), obligations, remaining)
    consents = [
        d
        for d in in_force
        if d.kind is DirectiveKind.CONSENT
        and _covers(d, requester)
        and (not d.purposes or query.purpose in d.purposes)
    ]
    if consents:
        reasons = tuple(
            _because(Rule.CONSENT, d, f"the patient consented to sharing {_whom(d)}")
            for d in consents
        )
        return Decision(True, Rule.CONSENT, reasons, obligations, remaining)
    return _deny(
        Rule.NO_CONSENT,
        [
            Reason(
                Rule.NO_CONSENT,
                f"outside the care team, no consent in force covers {requester.professional} "
                f"({requester.institution}) for {query.purpose.value}",
            )
        ],
    )


def _input_problems(
    directives: Sequence[Directive], query: AccessQuery, settings: PolicySettings
) -> Iterable[str]:
    if not _is(query.relationship, Relationship) or not _is(query.purpose, Purpose):
        yield "unknown relationship or purpose"
    elif query.purpose not in PURPOSES_OF[query.relationship]:
        yield f"purpose {query.purpose.value} does not go with {query.relationship.value}"
    if settings.outside_care_team not in ("opt-in", "opt-out"):
        yield f"unknown outside-care-team model {settings.outside_care_team!r}"
    if not query.studies:
        yield "no study asked for"
    if not query.requester.professional or not query.requester.institution:
        yield "the requester is not identified"
    if query.now.tzinfo is None:
        yield "now is not timezone-aware"
    for d in directives:
        where = f"directive {d.id} v{d.version}"
        if not _is(d.kind, DirectiveKind) or not _is(d.scope, Scope):
            yield f"{where}: unknown kind or scope"
            continue
        if d.scope not in SCOPES_OF[d.kind]:
            yield f"{where}: a {d.kind.value} cannot have scope {d.scope.value}"
        if (d.scope is Scope.ALL) != (d.value == ""):
            yield f"{where}: scope {d.scope.value} with value {d.value!r}"
        if d.purposes and (
            d.kind is not DirectiveKind.CONSENT or not all(_is(p, Purpose) for p in d.purposes)
        ):
            yield f"{where}: purposes only qualify a consent, from the known purposes"
        for moment in (d.valid_from, d.valid_until):
            if moment is not None and moment.tzinfo is None:
                yield f"{where}: a validity date is not timezone-aware"
        if (
            d.valid_from is not None
            and d.valid_until is not None
            and d.valid_from.tzinfo is not None
            and d.valid_until.tzinfo is not None
            and d.valid_from >= d.valid_until
        ):
            yield f"{where}: valid from {d.valid_from} until {d.valid_until}, reversed"
    duplicated = [i for i, n in Counter(d.id for d in directives).items() if n > 1]
    for directive_id in duplicated:
        yield f"directive {directive_id} is given in several versions"


def _is(value: object, kind: type[StrEnum]) -> bool:
    return isinstance(value, kind)


def _covers(directive: Directive, requester: Requester) -> bool:
    if directive.scope is Scope.ALL:
        return True
    if directive.scope is Scope.INSTITUTION:
        return directive.value == requester.institution
    if directive.scope is Scope.PROFESSIONAL:
        return directive.value == requester.professional
    return False


def _whom(directive: Directive) -> str:
    if directive.scope is Scope.ALL:
        return "with anyone"
    return f"with {directive.scope.value} {directive.value}"


def _because(rule: Rule, directive: Directive, text: str) -> Reason:
    return Reason(rule, text, directive.id, directive.version)


def _deny(rule: Rule, reasons: list[Reason]) -> Decision:
    return Decision(False, rule, tuple(reasons))
