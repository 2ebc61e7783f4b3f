"""Sharing: tickets from request to token, the decision, duty, break-the-glass, revocation.

Time is injected (``now``); shifts, windows and expiries are tested by travelling in it.
"""

from __future__ import annotations

import datetime as dt
from typing import Any
from unittest import mock

import pytest

from audit.events import EventCode, Outcome
from audit.models import AuditEvent
from broker.errors import Conflict, InvalidInput, NotFound, PermissionDenied
from broker.models import PatientIdentifier, Professional, Role
from broker.registration import manifest_register
from consent.services import directive_record, directive_withdraw
from sharing import selectors, services
from sharing.models import (
    AccessRequest,
    EmergencyReview,
    IssuedToken,
    PatientNotification,
    RequestState,
    Revocation,
)
from sharing.revocation import (
    RevocationList,
    TokenOutOfScope,
    TokenRevoked,
    token_check,
)
from sharing.tokens import TokenExpired, TokenNotYetValid, TokenUnknownKey, VerifiedTokens
from tests.conftest import NOW, SYSTEM, Region, make_user
from tests.dicom_factories import NIR
from tests.registry_helpers import kos_for, study_uid

pytestmark = pytest.mark.django_db

CHU_STUDY, PM_STUDY, NIGHT_STUDY = study_uid(1), study_uid(2), study_uid(3)
HOUR = dt.timedelta(hours=1)


def actor_of(user: Any):
    from audit.services import Actor

    return Actor(kind="user", user_id=user.pk, username=user.get_username())


@pytest.fixture
def dupont(region: Region):
    """Marie DUPONT: a CT at the CHU (CHU1) and one at Port-Maël (PM1), linked by her INS,
    and tonight's emergency CT at the CHU (28 Nov, 08:15 Paris time)."""
    for institution, ipp, study, day in (
        (region.chu, "CHU1", 1, dt.date(2026, 10, 1)),
        (region.portmael, "PM1", 2, dt.date(2026, 10, 1)),
        (region.chu, "CHU1", 3, dt.date(2026, 11, 28)),
    ):
        manifest_register(
            data=kos_for(institution, ipp, study=study, ins=NIR, study_date=day),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    return PatientIdentifier.objects.get(value="CHU1").patient


@pytest.fixture
def aubin_doctor(region: Region):
    """Dr Leroy, referring doctor at Saint-Aubin, where Mrs Dupont is not known."""
    return make_user("dr.leroy", [(region.staubin, Role.REFERRING_DOCTOR)])


@pytest.fixture
def teleradiologist(region: Region):
    return make_user("dr.tele", [(region.staubin, Role.TELERADIOLOGIST)])


@pytest.fixture
def emergency_doctor(region: Region):
    return make_user("dr.urgence", [(region.staubin, Role.EMERGENCY_DOCTOR)])


@pytest.fixture
def chu_admin(region: Region):
    return make_user("admin.chu", [(region.chu, Role.INSTITUTION_ADMIN)])


@pytest.fixture
def chu_clerk(region: Region):
    return make_user("clerk.chu", [(region.chu, Role.ADMISSIONS_CLERK)])


def ask(user, patient, institution, purpose="treatment", studies=(CHU_STUDY,), **extra):
    return services.request_create(
        user=user,
        purpose=purpose,
        patient=patient,
        institution=institution,
        studies=list(studies) if studies is not None else None,
        justification=extra.pop("justification", "bilan d'extension"),
        actor=actor_of(user),
        now=extra.pop("now", NOW),
        **extra,
    )


def token_for(user, ticket, studies=None, now=NOW):
    return services.token_issue_for_ticket(
        user=user, ticket=ticket, studies=studies, actor=actor_of(user), now=now
    )


def check(token, studies=(CHU_STUDY,), now=NOW, revocations=None):
    return token_check(
        token, studies=list(studies), now=now, revocations=revocations or RevocationList()
    )


def story(ticket) -> list[str]:
    return list(selectors.ticket_story(ticket=ticket).values_list("code", flat=True))


# ---------------------------------------------------------------------------
# Treatment


def test_care_team_treatment_is_approved_by_the_policy_and_gets_a_token(
    region, dupont, referring_doctor
):
    ticket = ask(referring_doctor, dupont, region.portmael)
    assert ticket.state == RequestState.APPROVED
    assert ticket.automatic
    assert ticket.source_institution == region.chu
    token, issued = token_for(referring_doctor, ticket)
    claims = check(token)
    assert claims.studies == (CHU_STUDY,)
    assert claims.ticket == str(ticket.public_id)
    assert claims.purpose == "treatment"
    assert claims.expires_at - claims.issued_at == dt.timedelta(minutes=15)
    # The token itself is nowhere in the database or the audit: only its hash.
    assert token not in str(list(AuditEvent.objects.values_list("details", flat=True)))
    assert issued.token_sha256 in str(AuditEvent.objects.get(code=EventCode.TOKEN_ISSUE).details)
    # One query tells the ticket's whole story, correlated by its ID.
    assert story(ticket) == [
        EventCode.REQUEST_CREATE,
        EventCode.REQUEST_APPROVE,
        EventCode.ACCESS_DECIDE,
        EventCode.TOKEN_ISSUE,
    ]
    decision = AuditEvent.objects.get(code=EventCode.ACCESS_DECIDE)
    assert decision.details["permit"] is True
    assert decision.details["relationship"] == "care_team"
    assert decision.purpose_of_use == "treatment"


def test_outside_the_care_team_a_radiologist_of_the_source_approves_and_consent_decides(
    region, dupont, aubin_doctor, radiologist, chu_clerk
):
    ticket = ask(aubin_doctor, dupont, region.staubin)
    assert ticket.state == RequestState.PENDING
    # The CHU's radiologists see it in their inbox; Port-Maël's do not.
    other = make_user("dr.pm.radio", [(region.portmael, Role.RADIOLOGIST)])
    assert list(selectors.inbox(user=radiologist)) == [ticket]
    assert list(selectors.inbox(user=other)) == []
    with pytest.raises(NotFound):
        services.request_approve(user=other, ticket=ticket, actor=actor_of(other), now=NOW)
    services.request_approve(user=radiologist, ticket=ticket, actor=actor_of(radiologist), now=NOW)
    ticket.refresh_from_db()
    assert ticket.state == RequestState.APPROVED
    assert ticket.decided_by.user == radiologist
    assert ticket.not_after == NOW + dt.timedelta(days=14)
    # Opt-in region, outside the care team, no consent: the token is refused, and the
    # refusal is in the audit trail (committed, not rolled back with the refusal).
    with pytest.raises(PermissionDenied) as refused:
        token_for(aubin_doctor, ticket)
    assert refused.value.code == "consent:consent:missing"
    denial = AuditEvent.objects.get(code=EventCode.ACCESS_DECIDE)
    assert denial.outcome == Outcome.MINOR_FAILURE
    assert denial.correlation_id == ticket.public_id
    assert not IssuedToken.objects.exists()
    directive_record(
        patient=dupont,
        institution=region.chu,
        recorder=chu_clerk,
        kind="consent",
        scope="institution",
        value=region.staubin.finess,
        note="consentement oral",
        actor=SYSTEM,
        now=NOW,
    )
    token, _ = token_for(aubin_doctor, ticket)
    assert check(token).studies == (CHU_STUDY,)


def test_treatment_requests_refuse_bad_input_and_store_nothing(region, dupont, referring_doctor):
    with pytest.raises(InvalidInput, match="one source institution"):
        ask(referring_doctor, dupont, region.portmael, studies=(CHU_STUDY, PM_STUDY))
    with pytest.raises(InvalidInput, match="no registered study"):
        ask(referring_doctor, dupont, region.portmael, studies=("1.2.3.4",))
    with pytest.raises(InvalidInput, match="names the institution"):
        ask(referring_doctor, dupont, region.portmael, studies=None)
    with pytest.raises(InvalidInput, match="justification"):
        ask(referring_doctor, dupont, region.portmael, justification="  ")
    with pytest.raises(InvalidInput, match="purpose"):
        ask(referring_doctor, dupont, region.portmael, purpose="research")
    assert not AccessRequest.objects.exists()


def test_all_studies_of_a_source(region, dupont, referring_doctor):
    ticket = ask(
        referring_doctor, dupont, region.portmael, studies=None, source_institution=region.chu
    )
    token, issued = token_for(referring_doctor, ticket)
    assert issued.studies == sorted([CHU_STUDY, NIGHT_STUDY])
    # Asking for a subset narrows the token; asking outside the ticket is refused.
    token, issued = token_for(referring_doctor, ticket, studies=[NIGHT_STUDY])
    assert issued.studies == [NIGHT_STUDY]
    with pytest.raises(PermissionDenied) as outside:
        token_for(referring_doctor, ticket, studies=[PM_STUDY])
    assert outside.value.code == "sharing:scope:outside-ticket"
    with pytest.raises(TokenOutOfScope):
        check(token, studies=(CHU_STUDY,))


def test_someone_else_cannot_use_a_ticket(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    colleague = make_user("dr.pm2", [(region.portmael, Role.REFERRING_DOCTOR)])
    with pytest.raises(PermissionDenied) as refused:
        token_for(colleague, ticket)
    assert refused.value.code == "sharing:relationship:not-holder"


# ---------------------------------------------------------------------------
# Avis


def test_an_avis_goes_to_the_named_specialist_who_gets_the_token_and_answers(
    region, dupont, referring_doctor, radiologist
):
    ticket = ask(
        referring_doctor,
        dupont,
        region.portmael,
        purpose="avis",
        studies=(PM_STUDY,),
        recipient=radiologist.professional,
        question="Nodule pulmonaire : avis sur la conduite à tenir ?",
    )
    assert ticket.state == RequestState.PENDING
    assert ticket.recipient_institution == region.chu
    assert list(selectors.inbox(user=radiologist)) == [ticket]
    with pytest.raises(NotFound):  # the requester does not approve their own
        services.request_approve(
            user=referring_doctor, ticket=ticket, actor=actor_of(referring_doctor), now=NOW
        )
    with pytest.raises(Conflict, match="once accepted"):
        services.avis_answer(
            user=radiologist, ticket=ticket, answer="...", actor=actor_of(radiologist), now=NOW
        )
    services.request_approve(user=radiologist, ticket=ticket, actor=actor_of(radiologist), now=NOW)
    ticket.refresh_from_db()
    token, _ = token_for(radiologist, ticket)
    assert check(token, studies=(PM_STUDY,)).subject == "dr.bernard"
    with pytest.raises(PermissionDenied):  # the token is the specialist's, not the asker's
        token_for(referring_doctor, ticket)
    # Still in the specialist's inbox until answered.
    assert list(selectors.inbox(user=radiologist)) == [ticket]
    services.avis_answer(
        user=radiologist,
        ticket=ticket,
        answer="Nodule de 6 mm : scanner de contrôle à 6 mois.",
        actor=actor_of(radiologist),
        now=NOW + HOUR,
    )
    ticket.refresh_from_db()
    assert ticket.answer.startswith("Nodule de 6 mm")
    assert ticket.answered_by.user == radiologist
    # The avis ends with its answer: the specialist's access ends with it.
    assert ticket.state == RequestState.EXPIRED
    assert ticket.end_reason == "answered"
    with pytest.raises(TokenRevoked):
        check(token, studies=(PM_STUDY,), now=NOW + HOUR / 30)
    assert list(selectors.inbox(user=radiologist)) == []
    with pytest.raises(Conflict):
        services.avis_answer(
            user=radiologist, ticket=ticket, answer="bis", actor=actor_of(radiologist), now=NOW
        )
    assert EventCode.AVIS_ANSWER in story(ticket)


def test_an_avis_sent_to_a_department_is_taken_by_one_of_its_radiologists(
    region, dupont, referring_doctor, radiologist
):
    colleague = make_user("dr.chu2", [(region.chu, Role.RADIOLOGIST)])
    ticket = ask(
        referring_doctor,
        dupont,
        region.portmael,
        purpose="avis",
        studies=(PM_STUDY,),
        recipient_institution=region.chu,
        question="Avis sur une IRM",
    )
    assert list(selectors.inbox(user=colleague)) == [ticket]
    assert list(selectors.inbox(user=radiologist)) == [ticket]
    services.request_approve(user=colleague, ticket=ticket, actor=actor_of(colleague), now=NOW)
    ticket.refresh_from_db()
    assert ticket.recipient.user == colleague
    token_for(colleague, ticket)
    with pytest.raises(PermissionDenied):
        token_for(radiologist, ticket)
    with pytest.raises(NotFound):
        services.avis_answer(
            user=radiologist, ticket=ticket, answer="x", actor=actor_of(radiologist), now=NOW
        )


def test_an_avis_is_denied_with_a_note(region, dupont, referring_doctor, radiologist):
    ticket = ask(
        referring_doctor,
        dupont,
        region.portmael,
        purpose="avis",
        studies=(PM_STUDY,),
        recipient=radiologist.professional,
        question="?",
    )
    with pytest.raises(InvalidInput):
        services.request_deny(
            user=radiologist, ticket=ticket, note="", actor=actor_of(radiologist), now=NOW
        )
    services.request_deny(
        user=radiologist,
        ticket=ticket,
        note="Hors de mon domaine",
        actor=actor_of(radiologist),
        now=NOW,
    )
    ticket.refresh_from_db()
    assert ticket.state == RequestState.DENIED
    with pytest.raises(Conflict):
        services.request_approve(
            user=radiologist, ticket=ticket, actor=actor_of(radiologist), now=NOW
        )
    with pytest.raises(PermissionDenied) as refused:
        token_for(radiologist, ticket)
    assert refused.value.code == "sharing:ticket:not-approved"


# ---------------------------------------------------------------------------
# Roles that never see images


@pytest.mark.parametrize("who", ["dpo", "institution_admin", "region_admin", "chu_clerk"])
def test_dpo_administrators_and_clerks_never_open_a_ticket(request, region, dupont, who):
    user = request.getfixturevalue(who)
    with pytest.raises(PermissionDenied):
        ask(user, dupont, region.chu)
    refusal = AuditEvent.objects.get(code=EventCode.ACCESS_DECIDE)
    assert refusal.outcome == Outcome.MINOR_FAILURE


def test_a_doctor_who_is_also_dpo_never_obtains_a_token(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    Professional.objects.get(user=referring_doctor).memberships.create(
        institution=region.chu, role=Role.DPO
    )
    with pytest.raises(PermissionDenied) as refused:
        token_for(referring_doctor, ticket)
    assert refused.value.code == "sharing:role:never-token"


# ---------------------------------------------------------------------------
# Duty roster


@pytest.fixture
def shift(region, teleradiologist, chu_admin):
    return services.shift_create(
        user=chu_admin,
        teleradiologist=teleradiologist.professional,
        institutions=[region.chu],
        starts_at=dt.datetime(2026, 11, 28, 6, 0, tzinfo=dt.UTC),
        ends_at=dt.datetime(2026, 11, 28, 18, 0, tzinfo=dt.UTC),
        agreement_reference="CONV-TELERADIO-2026-07",
        actor=actor_of(chu_admin),
        now=NOW - 5 * HOUR,
    )


def test_on_duty_the_teleradiologist_reads_the_shift_studies_and_tokens_end_with_it(
    region, dupont, teleradiologist, shift
):
    ticket = ask(
        teleradiologist, dupont, region.staubin, purpose="teleradiology", studies=(NIGHT_STUDY,)
    )
    assert ticket.state == RequestState.APPROVED
    assert ticket.not_after == shift.ends_at
    token, issued = token_for(
        teleradiologist, ticket, now=shift.ends_at - 5 * dt.timedelta(minutes=1)
    )
    assert issued.expires_at == shift.ends_at  # never outlives the shift
    # After the shift: nothing.
    with pytest.raises(TokenExpired):
        check(token, studies=(NIGHT_STUDY,), now=shift.ends_at)
    with pytest.raises(PermissionDenied) as after:
        token_for(teleradiologist, ticket, now=shift.ends_at)
    assert after.value.code == "sharing:ticket:ended"


def test_a_teleradiologist_reaches_nothing_outside_the_shift_period_or_institutions(
    region, dupont, teleradiologist, shift
):
    # October's study at the CHU is not of the shift's period.
    ticket = ask(
        teleradiologist, dupont, region.staubin, purpose="teleradiology", studies=(CHU_STUDY,)
    )
    with pytest.raises(PermissionDenied) as refused:
        token_for(teleradiologist, ticket)
    assert refused.value.code == "sharing:scope:no-study"
    # Port-Maël is not covered: no shift of theirs covers its study.
    with pytest.raises(PermissionDenied) as uncovered:
        ask(teleradiologist, dupont, region.staubin, purpose="teleradiology", studies=(PM_STUDY,))
    assert uncovered.value.code == "sharing:duty:off-shift"
    # Before the shift starts: off shift.
    with pytest.raises(PermissionDenied):
        ask(
            teleradiologist,
            dupont,
            region.staubin,
            purpose="teleradiology",
            studies=(NIGHT_STUDY,),
            now=shift.starts_at - HOUR,
        )


def test_cancelling_a_shift_revokes_its_tickets_and_tokens(
    region, dupont, teleradiologist, shift, chu_admin
):
    ticket = ask(
        teleradiologist, dupont, region.staubin, purpose="teleradiology", studies=(NIGHT_STUDY,)
    )
    token, _ = token_for(teleradiologist, ticket)
    services.shift_cancel(user=chu_admin, shift=shift, actor=actor_of(chu_admin), now=NOW)
    ticket.refresh_from_db()
    assert ticket.state == RequestState.REVOKED
    with pytest.raises(TokenRevoked):
        check(token, studies=(NIGHT_STUDY,))
    assert selectors.token_introspect(
        token=token, institution=region.chu, actor=SYSTEM, now=NOW
    ) == {"active": False}


def test_only_the_administrators_of_every_covered_institution_plan_shifts(
    region, teleradiologist, chu_admin, institution_admin, referring_doctor
):
    def plan(user, institutions, **overrides):
        values = {
            "starts_at": NOW,
            "ends_at": NOW + 12 * HOUR,
            "agreement_reference": "CONV-1",
        } | overrides
        return services.shift_create(
            user=user,
            teleradiologist=overrides.pop("who", teleradiologist.professional),
            institutions=institutions,
            actor=actor_of(user),
            now=NOW,
            **{k: v for k, v in values.items() if k != "who"},
        )

    with pytest.raises(PermissionDenied):
        plan(chu_admin, [region.chu, region.portmael])
    with pytest.raises(PermissionDenied):
        plan(referring_doctor, [region.portmael])
    with pytest.raises(InvalidInput, match="ends after"):
        plan(chu_admin, [region.chu], ends_at=NOW - HOUR)
    with pytest.raises(InvalidInput, match="7 days"):
        plan(chu_admin, [region.chu], ends_at=NOW + dt.timedelta(days=8))
    with pytest.raises(InvalidInput, match="not a teleradiologist"):
        plan(chu_admin, [region.chu], who=referring_doctor.professional)
    assert plan(institution_admin, [region.portmael]).agreement_reference == "CONV-1"


# ---------------------------------------------------------------------------
# Break-the-glass

JUSTIFICATION = "Patiente inconsciente aux urgences, suspicion de dissection aortique."


def glass(user, patient, institution, justification=JUSTIFICATION, now=NOW):
    return services.emergency_start(
        user=user,
        patient=patient,
        institution=institution,
        justification=justification,
        actor=actor_of(user),
        now=now,
    )


def test_break_the_glass_opens_a_window_with_alert_review_and_notification(
    region, dupont, emergency_doctor
):
    ticket = glass(emergency_doctor, dupont, region.staubin)
    assert ticket.state == RequestState.APPROVED
    assert ticket.not_after == NOW + 4 * HOUR
    started = AuditEvent.objects.get(code=EventCode.EMERGENCY_START)
    assert (started.event_id, started.event_type) == ("110113", "110127")
    assert started.correlation_id == ticket.public_id
    assert EmergencyReview.objects.get(request=ticket).reviewed_at is None
    assert PatientNotification.objects.get(request=ticket).patient == dupont
    # The token covers the patient's studies everywhere, and never outlives the window.
    _, issued = token_for(emergency_doctor, ticket, now=ticket.not_after - dt.timedelta(minutes=5))
    assert set(issued.studies) == {CHU_STUDY, PM_STUDY, NIGHT_STUDY}
    assert issued.expires_at == ticket.not_after
    # The window ends: the sweeper expires it and records Emergency Override Stopped.
    assert services.requests_expire(now=ticket.not_after) == 1
    ticket.refresh_from_db()
    assert ticket.state == RequestState.EXPIRED
    stopped = AuditEvent.objects.get(code=EventCode.EMERGENCY_STOP)
    assert (stopped.event_id, stopped.event_type) == ("110113", "110138")


def test_break_the_glass_stopped_by_the_doctor(region, dupont, emergency_doctor):
    ticket = glass(emergency_doctor, dupont, region.staubin)
    token, _ = token_for(emergency_doctor, ticket)
    services.request_cancel(
        user=emergency_doctor, ticket=ticket, actor=actor_of(emergency_doctor), now=NOW
    )
    assert AuditEvent.objects.filter(code=EventCode.EMERGENCY_STOP).count() == 1
    with pytest.raises(TokenRevoked):
        check(token, now=NOW + dt.timedelta(minutes=1))


def test_break_the_glass_refusals_are_audited(
    region, dupont, emergency_doctor, referring_doctor, chu_clerk
):
    with pytest.raises(InvalidInput, match="30 characters"):
        glass(emergency_doctor, dupont, region.staubin, justification="urgence")
    with pytest.raises(PermissionDenied):  # a referring doctor is not a role the region allows
        glass(referring_doctor, dupont, region.portmael)
    directive_record(
        patient=dupont,
        institution=region.chu,
        recorder=chu_clerk,
        kind="opposition",
        scope="all",
        note="opposition écrite",
        actor=SYSTEM,
        now=NOW - HOUR,
    )
    with pytest.raises(PermissionDenied) as opposed:  # never against an opposition
        glass(emergency_doctor, dupont, region.staubin)
    assert opposed.value.code == "consent:opposition"
    refusals = AuditEvent.objects.filter(code=EventCode.ACCESS_DECIDE)
    assert refusals.count() == 3
    assert {e.outcome for e in refusals} == {Outcome.MINOR_FAILURE}
    assert not AccessRequest.objects.exists()


def test_the_dpo_reviews_a_break_the_glass(region, dupont, emergency_doctor, dpo):
    ticket = glass(emergency_doctor, dupont, region.staubin)
    review = EmergencyReview.objects.get(request=ticket)
    assert list(selectors.emergency_reviews(institution_ids=[region.chu.pk])) == [review]
    with pytest.raises(InvalidInput):  # unjustified needs a comment
        services.emergency_review(
            user=dpo, review=review, outcome="unjustified", comment="", actor=actor_of(dpo), now=NOW
        )
    services.emergency_review(
        user=dpo, review=review, outcome="justified", comment="", actor=actor_of(dpo), now=NOW
    )
    review.refresh_from_db()
    assert review.outcome == "justified"
    with pytest.raises(Conflict):
        services.emergency_review(
            user=dpo, review=review, outcome="justified", comment="", actor=actor_of(dpo), now=NOW
        )
    assert EventCode.EMERGENCY_REVIEW in story(ticket)


# ---------------------------------------------------------------------------
# Tokens: time, revocation, consent changes, introspection


def test_tokens_are_refused_before_nbf_and_after_exp(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    token, _ = token_for(referring_doctor, ticket)
    with pytest.raises(TokenNotYetValid):
        check(token, now=NOW - dt.timedelta(seconds=1))
    check(token, now=NOW + dt.timedelta(minutes=14, seconds=59))
    with pytest.raises(TokenExpired):
        check(token, now=NOW + dt.timedelta(minutes=15))


def test_a_revoked_token_is_refused_everywhere_within_the_poll_delay(
    region, dupont, referring_doctor
):
    ticket = ask(referring_doctor, dupont, region.portmael)
    token, issued = token_for(referring_doctor, ticket)
    other_token, _ = token_for(referring_doctor, ticket)
    clock = [100.0]
    elsewhere = RevocationList(poll_seconds=0.5, clock=lambda: clock[0])  # another process
    check(token, revocations=elsewhere)
    services.token_revoke(
        user=referring_doctor,
        issued=issued,
        reason="poste partagé",
        actor=actor_of(referring_doctor),
        now=NOW,
    )
    clock[0] += 0.2  # its copy is still fresh: not seen yet
    check(token, revocations=elsewhere)
    clock[0] += 0.4  # past the poll delay: seen
    with pytest.raises(TokenRevoked):
        check(token, revocations=elsewhere)
    check(other_token, revocations=elsewhere)  # only that token
    assert selectors.token_introspect(
        token=token, institution=region.chu, actor=SYSTEM, now=NOW
    ) == {"active": False}
    # Revoking the ticket stops every token of it.
    services.request_revoke(
        user=make_user("admin.region2", region_admin=True),
        ticket=ticket,
        reason="erreur de patient",
        actor=SYSTEM,
        now=NOW,
    )
    with pytest.raises(TokenRevoked):
        check(other_token)
    assert Revocation.objects.filter(request_id=ticket.public_id).exists()


def test_an_opposition_recorded_after_issuance_revokes_the_ticket_in_its_transaction(
    region, dupont, aubin_doctor, radiologist, chu_clerk
):
    consent = directive_record(
        patient=dupont,
        institution=region.chu,
        recorder=chu_clerk,
        kind="consent",
        scope="all",
        note="consentement oral",
        actor=SYSTEM,
        now=NOW,
    )
    ticket = ask(aubin_doctor, dupont, region.staubin)
    services.request_approve(user=radiologist, ticket=ticket, actor=actor_of(radiologist), now=NOW)
    token, _ = token_for(aubin_doctor, ticket)
    assert selectors.token_introspect(token=token, institution=region.chu, actor=SYSTEM, now=NOW)[
        "active"
    ]
    directive_withdraw(
        directive=consent.directive,
        institution=region.chu,
        recorder=chu_clerk,
        actor=SYSTEM,
        now=NOW + HOUR / 60,
    )
    ticket.refresh_from_db()
    assert ticket.state == RequestState.REVOKED
    assert ticket.end_reason == "consent: consent:consent:missing"
    assert selectors.token_introspect(
        token=token, institution=region.chu, actor=SYSTEM, now=NOW
    ) == {"active": False}
    with pytest.raises(TokenRevoked):
        check(token)


def test_a_care_team_grant_survives_a_consent_withdrawal(
    region, dupont, referring_doctor, chu_clerk
):
    consent = directive_record(
        patient=dupont,
        institution=region.chu,
        recorder=chu_clerk,
        kind="consent",
        scope="all",
        note="oral",
        actor=SYSTEM,
        now=NOW,
    )
    ticket = ask(referring_doctor, dupont, region.portmael)
    directive_withdraw(
        directive=consent.directive,
        institution=region.chu,
        recorder=chu_clerk,
        actor=SYSTEM,
        now=NOW,
    )
    ticket.refresh_from_db()
    assert ticket.state == RequestState.APPROVED


def test_introspection_answers_rfc_7662(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    token, issued = token_for(referring_doctor, ticket)
    answer = selectors.token_introspect(token=token, institution=region.chu, actor=SYSTEM, now=NOW)
    assert answer["active"] is True
    assert answer["sub"] == "dr.martin"
    assert answer["jti"] == str(issued.token_id)
    assert answer["exp"] == int((NOW + dt.timedelta(minutes=15)).timestamp())
    assert answer["scope"] == f"study:{CHU_STUDY}"
    assert answer["ticket"] == str(ticket.public_id)
    for bad in ("", "x.y.z", token[:-4] + "AAAA", token + "é"):
        assert selectors.token_introspect(
            token=bad, institution=region.chu, actor=SYSTEM, now=NOW
        ) == {"active": False}
    assert selectors.token_introspect(
        token=token, institution=region.chu, actor=SYSTEM, now=NOW + dt.timedelta(hours=1)
    ) == {"active": False}
    # Only an archive holding one of the token's studies is told it is active.
    assert selectors.token_introspect(
        token=token, institution=region.staubin, actor=SYSTEM, now=NOW
    ) == {"active": False}
    events = AuditEvent.objects.filter(code=EventCode.TOKEN_INTROSPECT)
    assert events.count() == 7
    assert token not in str(list(events.values_list("details", flat=True)))


def test_orthanc_authorization_contract(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    token, _ = token_for(referring_doctor, ticket)

    def validate(level, uid, value=token, method="GET", institution=region.chu):
        body = {
            "dicom-uid": uid,
            "level": level,
            "method": method,
            "orthanc-id": "6eeded74-75005003-c3ae9738-d4a06a4f-6beedeb8",
            "token-key": "authorization",
            "token-value": value,
        }
        return selectors.orthanc_validate(body=body, institution=institution, actor=SYSTEM, now=NOW)

    assert validate("study", CHU_STUDY) == {"granted": True, "validity": 1}
    assert validate("series", f"{CHU_STUDY}.1") == {"granted": True, "validity": 1}
    assert validate("instance", f"{CHU_STUDY}.1.1") == {"granted": True, "validity": 1}
    assert validate("study", PM_STUDY) == {"granted": False, "validity": 0}
    assert validate("series", f"{PM_STUDY}.1") == {"granted": False, "validity": 0}
    assert validate("patient", "CHU1") == {"granted": False, "validity": 0}
    assert validate("study", CHU_STUDY, value="") == {"granted": False, "validity": 0}
    assert validate("study", CHU_STUDY, value=f"Bearer {token}")["granted"]
    # A retrieval token reads: never changes nor deletes.
    for method in ("delete", "put", "post"):
        assert validate("study", CHU_STUDY, method=method) == {"granted": False, "validity": 0}
    # Only the archive that holds the study, for that patient, is answered "granted".
    for elsewhere in (region.portmael, region.staubin):
        assert validate("study", CHU_STUDY, institution=elsewhere)["granted"] is False
        assert validate("series", f"{CHU_STUDY}.1", institution=elsewhere)["granted"] is False


def test_expire_requests_command_ends_what_is_over(region, dupont, emergency_doctor):
    from io import StringIO

    from django.core.management import call_command

    ticket = glass(emergency_doctor, dupont, region.staubin)  # its window ended hours ago
    out = StringIO()
    call_command("expire_requests", stdout=out)
    assert out.getvalue().strip() == "1 request(s) expired."
    ticket.refresh_from_db()
    assert ticket.state == RequestState.EXPIRED
    stopped = AuditEvent.objects.get(code=EventCode.EMERGENCY_STOP)
    assert stopped.actor_kind == "system"


@pytest.mark.django_db(transaction=True)
def test_a_revocation_reaches_another_process_within_a_second(region, referring_doctor):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from django.conf import settings
    from django.db import connection
    from django.utils import timezone

    for institution, ipp, study in ((region.chu, "CHU1", 1), (region.portmael, "PM1", 2)):
        manifest_register(
            data=kos_for(institution, ipp, study=study, ins=NIR),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    patient = PatientIdentifier.objects.get(value="CHU1").patient
    ticket = ask(referring_doctor, patient, region.portmael, now=timezone.now())
    token, issued = token_for(referring_doctor, ticket, now=timezone.now())
    db = connection.settings_dict
    url = (
        f"sqlite:///{db['NAME']}"
        if connection.vendor == "sqlite"
        else f"postgres://{db['USER'] or 'postgres'}@{db['HOST'] or '127.0.0.1'}:"
        f"{db['PORT'] or 5432}/{db['NAME']}"
    )
    with subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("token_watcher.py")), CHU_STUDY],
        env={
            **os.environ,
            "DATABASE_URL": url,
            "RELAIS_DATA_DIR": str(settings.DATA_DIR),
            "RELAIS_WATCHED_TOKEN": token,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as watcher:
        try:
            ready = watcher.stdout.readline().strip()
            assert ready == "ready", watcher.stderr.read()
            services.token_revoke(
                user=referring_doctor,
                issued=issued,
                reason="test",
                actor=actor_of(referring_doctor),
                now=timezone.now(),
            )
            committed = time.time()
            line = watcher.stdout.readline().split()
        finally:
            watcher.kill()
    assert line[0] == "revoked", line
    # Within the poll delay (0.5 s) plus the check's own pace: well under a second.
    assert float(line[1]) - committed < 1.0


def test_the_decision_fails_closed_and_says_so_in_the_audit(
    region, dupont, referring_doctor, monkeypatch
):
    from sharing import decision

    ticket = ask(referring_doctor, dupont, region.portmael)

    def broken(*args, **kwargs):
        raise RuntimeError("the registry is on fire")

    monkeypatch.setattr(decision, "ticket_studies", broken)
    with pytest.raises(PermissionDenied) as refused:
        token_for(referring_doctor, ticket)
    assert refused.value.code == "sharing:decision:error"
    assert "fire" not in refused.value.detail  # the cause stays in the logs
    denial = AuditEvent.objects.get(code=EventCode.ACCESS_DECIDE)
    assert denial.outcome == Outcome.MINOR_FAILURE
    assert denial.details["reasons"] == [
        {"code": "sharing:decision:error", "text": "the decision could not be made"}
    ]
    assert not IssuedToken.objects.exists()


# ---------------------------------------------------------------------------
# Found in review


def test_a_superuser_neither_approves_nor_answers(region, dupont, referring_doctor, radiologist):
    root = make_user("root.admin")
    root.is_superuser = True
    root.save()
    ticket = ask(
        referring_doctor,
        dupont,
        region.portmael,
        purpose="avis",
        studies=(PM_STUDY,),
        recipient=radiologist.professional,
        question="?",
    )
    assert list(selectors.inbox(user=root)) == []
    with pytest.raises(NotFound):
        services.request_approve(user=root, ticket=ticket, actor=actor_of(root), now=NOW)
    with pytest.raises(NotFound):
        services.avis_answer(user=root, ticket=ticket, answer="x", actor=actor_of(root), now=NOW)


def test_an_avis_is_asked_about_a_patient_of_ones_own(region, dupont, aubin_doctor, radiologist):
    with pytest.raises(PermissionDenied) as refused:
        ask(
            aubin_doctor,
            dupont,
            region.staubin,
            purpose="avis",
            studies=None,
            recipient=radiologist.professional,
            question="?",
        )
    assert refused.value.code == "sharing:avis:not-care-team"
    assert AuditEvent.objects.get(code=EventCode.ACCESS_DECIDE).outcome == Outcome.MINOR_FAILURE
    assert not AccessRequest.objects.exists()


def test_who_takes_a_department_avis_holds_it_alone(region, dupont, referring_doctor, radiologist):
    colleague = make_user("dr.chu2", [(region.chu, Role.RADIOLOGIST)])
    ticket = ask(
        referring_doctor,
        dupont,
        region.portmael,
        purpose="avis",
        studies=(PM_STUDY,),
        recipient_institution=region.chu,
        question="?",
    )
    services.request_approve(user=colleague, ticket=ticket, actor=actor_of(colleague), now=NOW)
    ticket.refresh_from_db()
    assert not selectors.may_see_ticket(radiologist, ticket)
    with pytest.raises(NotFound):
        services.request_revoke(
            user=radiologist, ticket=ticket, reason="x", actor=actor_of(radiologist), now=NOW
        )
    assert selectors.may_see_ticket(colleague, ticket)


def test_revoking_a_break_the_glass_stops_the_override(region, dupont, emergency_doctor, dpo):
    ticket = glass(emergency_doctor, dupont, region.staubin)
    services.request_revoke(user=dpo, ticket=ticket, reason="non justifié", actor=SYSTEM, now=NOW)
    stopped = AuditEvent.objects.get(code=EventCode.EMERGENCY_STOP)
    assert stopped.correlation_id == ticket.public_id


def test_a_request_left_pending_too_long_cannot_be_approved(
    region, dupont, aubin_doctor, radiologist
):
    ticket = ask(aubin_doctor, dupont, region.staubin)
    later = NOW + dt.timedelta(days=15)
    with pytest.raises(Conflict, match="expired"):
        services.request_approve(
            user=radiologist, ticket=ticket, actor=actor_of(radiologist), now=later
        )
    assert services.requests_expire(now=later) == 1


def test_a_shift_is_not_recorded_long_after_it_began(region, teleradiologist, chu_admin):
    with pytest.raises(InvalidInput, match="an hour"):
        services.shift_create(
            user=chu_admin,
            teleradiologist=teleradiologist.professional,
            institutions=[region.chu],
            starts_at=NOW - 3 * HOUR,
            ends_at=NOW + HOUR,
            agreement_reference="CONV",
            actor=SYSTEM,
            now=NOW,
        )


def test_the_review_queue_shows_pending_reviews_first(region, dupont, emergency_doctor, dpo):
    first = glass(emergency_doctor, dupont, region.staubin)
    second = glass(emergency_doctor, dupont, region.staubin, now=NOW + HOUR)
    services.emergency_review(
        user=dpo,
        review=EmergencyReview.objects.get(request=first),
        outcome="justified",
        comment="",
        actor=SYSTEM,
        now=NOW + 2 * HOUR,
    )
    queue = list(selectors.emergency_reviews(institution_ids=[region.chu.pk]))
    assert [r.request for r in queue] == [second, first]


def test_a_cached_verification_still_checks_time_and_keys(region, dupont, referring_doctor):
    ticket = ask(referring_doctor, dupont, region.portmael)
    token, _ = token_for(referring_doctor, ticket)
    verified = VerifiedTokens(size=2)
    assert token_check(token, studies=[CHU_STUDY], now=NOW, verified=verified)
    # From the cache: the same answer, the same time checks.
    assert token_check(token, studies=[CHU_STUDY], now=NOW, verified=verified)
    with pytest.raises(TokenExpired):
        token_check(
            token, studies=[CHU_STUDY], now=NOW + dt.timedelta(minutes=15), verified=verified
        )
    with pytest.raises(TokenNotYetValid):
        token_check(
            token, studies=[CHU_STUDY], now=NOW - dt.timedelta(seconds=1), verified=verified
        )
    # A key no longer trusted drops what it signed, cached or not.
    with (
        mock.patch("sharing.revocation.verification_keys", return_value={}),
        pytest.raises(TokenUnknownKey),
    ):
        token_check(token, studies=[CHU_STUDY], now=NOW, verified=verified)


def test_staff_of_an_institution_taken_out_of_the_region_act_for_it_no_more(
    region, dupont, referring_doctor
):
    """An inactive institution's memberships count for nothing: its doctor can neither ask,
    nor retrieve, nor browse the registry on its behalf (memberships and tickets are kept)."""
    from broker.access import manifests_visible_to, patients_visible_to

    ticket = ask(
        referring_doctor, dupont, region.portmael, studies=None, source_institution=region.chu
    )
    token_for(referring_doctor, ticket)  # while the institution is in the region
    assert patients_visible_to(referring_doctor).filter(pk=dupont.pk).exists()
    region.portmael.active = False
    region.portmael.save(update_fields=["active"])
    referring_doctor = type(referring_doctor).objects.get(pk=referring_doctor.pk)  # no cache
    assert not patients_visible_to(referring_doctor).exists()
    assert not manifests_visible_to(referring_doctor).exists()
    with pytest.raises(PermissionDenied):
        token_for(referring_doctor, ticket)
    with pytest.raises(PermissionDenied):
        ask(referring_doctor, dupont, region.portmael, studies=None, source_institution=region.chu)
