"""The consent policy, pure: examples that read as the regional rules, then a reference truth
table checked by hypothesis over every combination of directive kinds, scopes, dates,
relationships and purposes."""

from __future__ import annotations

import datetime as dt
from itertools import product

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from consent.policy import (
    AccessQuery,
    Directive,
    DirectiveKind,
    PolicySettings,
    Purpose,
    Relationship,
    Requester,
    Rule,
    Scope,
    StudyRef,
    evaluate,
)

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
DAY = dt.timedelta(days=1)
CHU, PORTMAEL, STAUBIN = "350000014", "560000019", "290000012"
DR_MARTIN, DR_BERNARD = "10000000001", "10000000002"
CT, MR = "1.2.3.1", "1.2.3.2"
STUDIES = (StudyRef(CT, CHU), StudyRef(MR, PORTMAEL))
MARTIN_AT_PORTMAEL = Requester(DR_MARTIN, PORTMAEL)


def query(
    relationship: Relationship = Relationship.CARE_TEAM,
    purpose: Purpose = Purpose.TREATMENT,
    requester: Requester = MARTIN_AT_PORTMAEL,
    studies: tuple[StudyRef, ...] = STUDIES,
    now: dt.datetime = NOW,
) -> AccessQuery:
    return AccessQuery(requester, relationship, purpose, studies, now)


def opposition(scope: Scope = Scope.ALL, value: str = "", **kwargs) -> Directive:
    return Directive(1, 1, DirectiveKind.OPPOSITION, scope, value, **kwargs)


def consent(scope: Scope = Scope.ALL, value: str = "", **kwargs) -> Directive:
    return Directive(2, 1, DirectiveKind.CONSENT, scope, value, **kwargs)


def mask(study: str, **kwargs) -> Directive:
    return Directive(3, 1, DirectiveKind.MASK, Scope.STUDY, study, **kwargs)


# --------------------------------------------------------------------------- the rules


def test_the_care_team_may_see_a_patient_who_said_nothing():
    decision = evaluate([], query())
    assert decision.permit
    assert decision.rule is Rule.CARE_TEAM
    assert decision.studies == (CT, MR)


def test_a_global_opposition_denies_everyone_even_in_an_emergency():
    for relationship, purpose in [
        (Relationship.CARE_TEAM, Purpose.TREATMENT),
        (Relationship.DUTY, Purpose.TELERADIOLOGY),
        (Relationship.NONE, Purpose.EMERGENCY),
    ]:
        decision = evaluate([opposition()], query(relationship, purpose))
        assert not decision.permit
        assert decision.rule is Rule.OPPOSITION
        (reason,) = decision.reasons
        assert (reason.directive_id, reason.directive_version) == (1, 1)


def test_an_opposition_to_one_institution_or_professional_spares_the_others():
    assert not evaluate([opposition(Scope.INSTITUTION, PORTMAEL)], query()).permit
    assert evaluate([opposition(Scope.INSTITUTION, STAUBIN)], query()).permit
    assert not evaluate([opposition(Scope.PROFESSIONAL, DR_MARTIN)], query()).permit
    assert evaluate([opposition(Scope.PROFESSIONAL, DR_BERNARD)], query()).permit


def test_a_withdrawn_expired_or_future_opposition_no_longer_holds():
    assert evaluate([opposition(withdrawn=True)], query()).permit
    assert evaluate([opposition(valid_until=NOW)], query()).permit  # until is exclusive
    assert evaluate([opposition(valid_from=NOW + DAY)], query()).permit
    assert not evaluate([opposition(valid_from=NOW, valid_until=NOW + DAY)], query()).permit


def test_outside_the_care_team_a_consent_is_needed():
    outside = query(Relationship.NONE, Purpose.AVIS)
    assert evaluate([], outside).rule is Rule.NO_CONSENT
    assert not evaluate([], outside).permit
    granted = evaluate([consent(Scope.INSTITUTION, PORTMAEL)], outside)
    assert granted.permit
    assert granted.rule is Rule.CONSENT
    assert granted.reasons[0].directive_id == 2
    assert not evaluate([consent(Scope.INSTITUTION, STAUBIN)], outside).permit


def test_a_consent_for_some_purposes_covers_only_those():
    outside = query(Relationship.NONE, Purpose.AVIS)
    assert evaluate([consent(purposes=frozenset({Purpose.AVIS}))], outside).permit
    assert not evaluate([consent(purposes=frozenset({Purpose.TREATMENT}))], outside).permit


def test_break_the_glass_needs_no_consent_but_never_overrides_an_opposition():
    emergency = query(Relationship.NONE, Purpose.EMERGENCY)
    assert evaluate([], emergency).rule is Rule.EMERGENCY
    assert evaluate([opposition(Scope.PROFESSIONAL, DR_MARTIN)], emergency).rule is Rule.OPPOSITION


def test_a_masked_study_is_left_out_outside_its_hospital_only():
    decision = evaluate([mask(CT)], query())
    assert decision.permit
    assert decision.excluded == {CT}
    assert decision.studies == (MR,)
    at_the_chu = evaluate([mask(CT)], query(requester=Requester(DR_BERNARD, CHU)))
    assert at_the_chu.excluded == frozenset()
    only_masked = evaluate([mask(CT)], query(studies=(StudyRef(CT, CHU),)))
    assert not only_masked.permit
    assert only_masked.rule is Rule.ALL_MASKED


def test_an_opt_out_region_permits_outside_the_care_team_unless_opposed():
    opt_out = PolicySettings(outside_care_team="opt-out")
    outside = query(Relationship.NONE, Purpose.TREATMENT)
    assert evaluate([], outside, opt_out).rule is Rule.OPT_OUT
    assert not evaluate([opposition()], outside, opt_out).permit


@pytest.mark.parametrize(
    ("directives", "q"),
    [
        ([], query(Relationship.DUTY, Purpose.AVIS)),  # a purpose that does not go with it
        ([], query(Relationship.AVIS_RECIPIENT, Purpose.EMERGENCY)),
        ([], query(studies=())),
        ([], query(now=NOW.replace(tzinfo=None))),
        ([], query(requester=Requester("", PORTMAEL))),
        ([consent(valid_from=NOW + DAY, valid_until=NOW)], query()),  # dates reversed
        ([mask(CT), Directive(3, 2, DirectiveKind.MASK, Scope.STUDY, MR)], query()),  # 2 versions
        ([Directive(4, 1, DirectiveKind.MASK, Scope.ALL)], query()),
        ([Directive(4, 1, DirectiveKind.OPPOSITION, Scope.STUDY, CT)], query()),
        ([Directive(4, 1, DirectiveKind.OPPOSITION, Scope.ALL, CHU)], query()),
        ([Directive(4, 1, DirectiveKind.OPPOSITION, Scope.INSTITUTION, "")], query()),
        ([opposition(purposes=frozenset({Purpose.AVIS}))], query()),
        ([Directive(4, 1, "oops", Scope.ALL)], query()),  # type: ignore[arg-type]
    ],
)
def test_unknown_or_contradictory_input_denies(directives, q):
    decision = evaluate(directives, q)
    assert not decision.permit
    assert decision.rule is Rule.INVALID_INPUT
    assert decision.reasons


# --------------------------------------------------------------------------- truth table


# The expected decision for each combination of the facts that matter, written as a table
# rather than derived like the implementation: (valid input, opposed, every study masked,
# care team, emergency, opt-out region, consent covers it) -> (permit, rule).
def _expected(valid, opposed, all_masked, care_team, emergency, opt_out, consented):
    if not valid:
        return False, Rule.INVALID_INPUT
    if opposed:
        return False, Rule.OPPOSITION
    if all_masked:
        return False, Rule.ALL_MASKED
    return {
        (True, False, False, False): (True, Rule.CARE_TEAM),
        (True, False, False, True): (True, Rule.CARE_TEAM),
        (True, False, True, False): (True, Rule.CARE_TEAM),
        (True, False, True, True): (True, Rule.CARE_TEAM),
        (True, True, False, False): (True, Rule.CARE_TEAM),
        (True, True, False, True): (True, Rule.CARE_TEAM),
        (True, True, True, False): (True, Rule.CARE_TEAM),
        (True, True, True, True): (True, Rule.CARE_TEAM),
        (False, True, False, False): (True, Rule.EMERGENCY),
        (False, True, False, True): (True, Rule.EMERGENCY),
        (False, True, True, False): (True, Rule.EMERGENCY),
        (False, True, True, True): (True, Rule.EMERGENCY),
        (False, False, True, False): (True, Rule.OPT_OUT),
        (False, False, True, True): (True, Rule.OPT_OUT),
        (False, False, False, True): (True, Rule.CONSENT),
        (False, False, False, False): (False, Rule.NO_CONSENT),
    }[(care_team, emergency, opt_out, consented)]


TIMES = [None, NOW - 2 * DAY, NOW - DAY, NOW, NOW + DAY]
VALUES = ["", CHU, PORTMAEL, DR_MARTIN, DR_BERNARD, CT, MR]


VALUE_OF_SCOPE = {
    Scope.ALL: [""],
    Scope.INSTITUTION: [CHU, PORTMAEL, STAUBIN],
    Scope.PROFESSIONAL: [DR_MARTIN, DR_BERNARD],
    Scope.STUDY: [CT, MR],
}
SCOPES_OF_KIND = {
    DirectiveKind.OPPOSITION: [Scope.ALL, Scope.INSTITUTION, Scope.PROFESSIONAL],
    DirectiveKind.CONSENT: [Scope.ALL, Scope.INSTITUTION, Scope.PROFESSIONAL],
    DirectiveKind.MASK: [Scope.STUDY],
}


def _sometimes_wrong(draw, right, anything):
    """Mostly a well-formed value, now and then any value at all (to test the fail-closed)."""
    return draw(st.sampled_from(anything)) if draw(st.integers(0, 19)) == 0 else right


@st.composite
def directives(draw):
    count = draw(st.integers(0, 4))
    ids = list(range(1, count + 1))
    if count and draw(st.integers(0, 9)) == 0:
        ids[-1] = ids[0]  # one directive given twice
    made = []
    for directive_id in ids:
        kind = draw(st.sampled_from(DirectiveKind))
        scope = _sometimes_wrong(draw, draw(st.sampled_from(SCOPES_OF_KIND[kind])), list(Scope))
        value = _sometimes_wrong(draw, draw(st.sampled_from(VALUE_OF_SCOPE[scope])), VALUES)
        purposes = draw(st.frozensets(st.sampled_from(Purpose), max_size=2))
        if kind is not DirectiveKind.CONSENT:
            purposes = _sometimes_wrong(draw, frozenset(), [purposes])
        start, end = draw(st.sampled_from(TIMES)), draw(st.sampled_from(TIMES))
        if start is not None and end is not None and start >= end:
            start, end = _sometimes_wrong(draw, (None, end), [(start, end)])
        made.append(
            Directive(
                id=directive_id,
                version=draw(st.integers(1, 3)),
                kind=kind,
                scope=scope,
                value=value,
                purposes=purposes,
                valid_from=start,
                valid_until=end,
                withdrawn=draw(st.integers(0, 3)) == 0,
            )
        )
    return made


def _facts(ds, q, model):
    """The facts of the table, computed the plain way, one directive at a time."""
    valid = q.purpose in {
        Relationship.CARE_TEAM: {Purpose.TREATMENT, Purpose.EMERGENCY},
        Relationship.DUTY: {Purpose.TELERADIOLOGY},
        Relationship.AVIS_RECIPIENT: {Purpose.AVIS},
        Relationship.NONE: {Purpose.TREATMENT, Purpose.AVIS, Purpose.EMERGENCY},
    }[q.relationship] and len({d.id for d in ds}) == len(ds)
    for d in ds:
        allowed = {Scope.STUDY} if d.kind == DirectiveKind.MASK else set(Scope) - {Scope.STUDY}
        valid = valid and d.scope in allowed
        valid = valid and ((d.scope == Scope.ALL) == (d.value == ""))
        valid = valid and (not d.purposes or d.kind == DirectiveKind.CONSENT)
        if d.valid_from is not None and d.valid_until is not None:
            valid = valid and d.valid_from < d.valid_until

    def live(d):
        if d.withdrawn:
            return False
        if d.valid_from is not None and d.valid_from > NOW:
            return False
        return not (d.valid_until is not None and d.valid_until <= NOW)

    def mine(d):
        return (
            d.scope == Scope.ALL
            or (d.scope == Scope.INSTITUTION and d.value == q.requester.institution)
            or (d.scope == Scope.PROFESSIONAL and d.value == q.requester.professional)
        )

    opposed = any(live(d) and d.kind == DirectiveKind.OPPOSITION and mine(d) for d in ds)
    masked = {d.value for d in ds if live(d) and d.kind == DirectiveKind.MASK}
    shown = [
        s.study_instance_uid
        for s in q.studies
        if not (s.study_instance_uid in masked and s.source_institution != q.requester.institution)
    ]
    consented = any(
        live(d)
        and d.kind == DirectiveKind.CONSENT
        and mine(d)
        and (not d.purposes or q.purpose in d.purposes)
        for d in ds
    )
    return (
        valid,
        opposed,
        not shown,
        q.relationship != Relationship.NONE,
        q.purpose == Purpose.EMERGENCY,
        model == "opt-out",
        consented,
    ), shown


@st.composite
def situations(draw):
    """A relationship and a purpose: mostly ones that go together."""
    relationship = draw(st.sampled_from(Relationship))
    valid = sorted(
        {
            Relationship.CARE_TEAM: {Purpose.TREATMENT, Purpose.EMERGENCY},
            Relationship.DUTY: {Purpose.TELERADIOLOGY},
            Relationship.AVIS_RECIPIENT: {Purpose.AVIS},
            Relationship.NONE: {Purpose.TREATMENT, Purpose.AVIS, Purpose.EMERGENCY},
        }[relationship]
    )
    purpose = _sometimes_wrong(draw, draw(st.sampled_from(valid)), list(Purpose))
    return relationship, purpose


@settings(max_examples=2500, deadline=None)
@given(
    ds=directives(),
    situation=situations(),
    requester=st.sampled_from(
        [Requester(DR_MARTIN, PORTMAEL), Requester(DR_BERNARD, CHU), Requester(DR_MARTIN, STAUBIN)]
    ),
    studies=st.sampled_from([STUDIES, STUDIES[:1], STUDIES[1:]]),
    model=st.sampled_from(["opt-in", "opt-out"]),
)
def test_the_evaluation_matches_the_truth_table(ds, situation, requester, studies, model):
    relationship, purpose = situation
    q = query(relationship, purpose, requester, studies)
    decision = evaluate(ds, q, PolicySettings(outside_care_team=model))
    facts, shown = _facts(ds, q, model)
    event(decision.rule.value)
    assert (decision.permit, decision.rule) == _expected(*facts)
    assert decision.reasons, "a decision always says why"
    if decision.permit:
        assert list(decision.studies) == shown
        assert all(o.reason.directive_id is not None for o in decision.obligations)
    if decision.rule in (Rule.OPPOSITION, Rule.CONSENT):
        assert all(r.directive_id is not None and r.directive_version for r in decision.reasons)


def test_the_truth_table_is_complete():
    for facts in product([True, False], repeat=7):
        permit, rule = _expected(*facts)
        assert isinstance(permit, bool)
        assert rule in Rule


@settings(max_examples=1000, deadline=None)
@given(
    ds=directives(),
    purpose=st.sampled_from([Purpose.TREATMENT, Purpose.AVIS]),
    requester=st.sampled_from([Requester(DR_MARTIN, PORTMAEL), Requester(DR_BERNARD, CHU)]),
)
def test_outside_the_care_team_the_evaluation_matches_the_truth_table(ds, purpose, requester):
    """The same table, where consents decide: no relationship, an opt-in region."""
    q = query(Relationship.NONE, purpose, requester)
    decision = evaluate(ds, q)
    facts, _ = _facts(ds, q, "opt-in")
    event(decision.rule.value)
    assert (decision.permit, decision.rule) == _expected(*facts)
