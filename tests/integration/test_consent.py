"""Patients' directives: who records them, versions, evidence encrypted at rest, and how they
follow the regional patient through identity links and unlinks."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.exceptions import InvalidTag
from django.conf import settings
from django.test import override_settings

from audit.events import EventCode
from audit.models import AuditEvent
from broker.errors import Conflict, InvalidInput, PermissionDenied
from broker.identity import patient_unlink
from broker.models import PatientIdentifier, Role
from broker.registration import manifest_register
from consent import policy
from consent.evidence import Sealed, unseal
from consent.models import Directive, DirectiveVersion, Evidence
from consent.selectors import consent_evaluate, directive_versions, policy_directives
from consent.services import directive_record, directive_withdraw
from consent.signals import consent_restricted
from tests.conftest import NOW, SYSTEM, Region, make_user
from tests.dicom_factories import NIR
from tests.registry_helpers import kos_for, study_uid

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.7\n% a signed form\n" + b"x" * 2000 + b"\n%%EOF\n"


@pytest.fixture
def chu_clerk(region: Region):
    return make_user("clerk.chu", [(region.chu, Role.ADMISSIONS_CLERK)])


@pytest.fixture
def dupont(region: Region):
    """Marie DUPONT, known at the CHU (IPP CHU1) and at Port-Maël (PM1), linked by her INS."""
    for institution, ipp, study in ((region.chu, "CHU1", 1), (region.portmael, "PM1", 2)):
        manifest_register(
            data=kos_for(institution, ipp, study=study, ins=NIR),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    patient = PatientIdentifier.objects.get(value="CHU1").patient
    assert PatientIdentifier.objects.get(value="PM1").patient == patient
    return patient


def record(patient, institution, recorder, **values):
    values.setdefault("kind", "opposition")
    values.setdefault("scope", "all")
    return directive_record(
        patient=patient,
        institution=institution,
        recorder=recorder,
        actor=SYSTEM,
        now=NOW,
        **values,
    )


def test_a_clerk_records_an_opposition_for_a_patient_known_at_their_hospital(
    region, dupont, chu_clerk, django_capture_on_commit_callbacks
):
    received = []
    consent_restricted.connect(lambda **kw: received.append(kw), weak=False, dispatch_uid="t")
    try:
        with django_capture_on_commit_callbacks(execute=True):
            version = record(dupont, region.chu, chu_clerk, evidence=PDF, note="formulaire signé")
    finally:
        consent_restricted.disconnect(dispatch_uid="t")
    assert version.version == 1
    assert version.directive.identifier.value == "CHU1"
    assert version.recorded_by == "clerk.chu"
    assert version.recorded_at_institution == region.chu
    (event,) = AuditEvent.objects.filter(code=EventCode.CONSENT_RECORD)
    assert event.patient_id == str(dupont.public_id)
    assert event.details["evidence_sha256"] == version.evidence.sha256
    assert received == [
        {
            "signal": consent_restricted,
            "sender": Directive,
            "patient_id": dupont.pk,
            "directive_id": version.directive_id,
            "version": 1,
        }
    ]
    (in_force,) = policy_directives(patient=dupont)
    assert in_force.kind is policy.DirectiveKind.OPPOSITION


def test_only_a_clerk_or_a_doctor_where_the_patient_is_known_may_record(
    region, dupont, clerk, referring_doctor, dpo, institution_admin
):
    with pytest.raises(PermissionDenied) as unknown_here:
        record(dupont, region.staubin, clerk)  # Saint-Aubin does not know her
    assert unknown_here.value.code == "consent:patient:unknown-here"
    assert record(dupont, region.portmael, referring_doctor).directive.identifier.value == "PM1"
    for user, institution in ((dpo, region.chu), (institution_admin, region.portmael)):
        with pytest.raises(PermissionDenied) as refused:
            record(dupont, institution, user)
        assert refused.value.code == "consent:recorder:not-allowed"
    assert Directive.objects.count() == 1


def test_a_withdrawal_is_a_new_version_and_the_first_is_kept(region, dupont, chu_clerk):
    first = record(
        dupont,
        region.chu,
        chu_clerk,
        kind="consent",
        scope="institution",
        value=region.staubin.finess,
        note="consentement oral, en consultation",
    )
    second = directive_withdraw(
        directive=first.directive, institution=region.chu, recorder=chu_clerk, actor=SYSTEM, now=NOW
    )
    assert (second.version, second.withdrawn) == (2, True)
    assert [(v.version, v.withdrawn) for v in directive_versions(patient=dupont)] == [
        (1, False),
        (2, True),
    ]
    (current,) = policy_directives(patient=dupont)
    assert (current.version, current.withdrawn) == (2, True)
    with pytest.raises(Conflict):
        directive_withdraw(
            directive=first.directive,
            institution=region.chu,
            recorder=chu_clerk,
            actor=SYSTEM,
            now=NOW,
        )
    assert AuditEvent.objects.filter(code=EventCode.CONSENT_WITHDRAW).count() == 1


@pytest.mark.parametrize(
    "values",
    [
        {"valid_from": NOW, "valid_until": NOW - dt.timedelta(days=1)},
        {"scope": "institution", "value": "999999999"},  # unknown institution
        {"kind": "mask", "scope": "all"},
        {"kind": "opposition", "scope": "study", "value": "1.2.3"},
        {"purposes": ["avis"]},  # an opposition has no purposes
        {"kind": "consent", "purposes": ["shopping"]},
        {"kind": "nonsense"},
        {"scope": "institution", "value": ""},
        {"evidence": b"GIF89a not a form"},
        {"evidence": b""},
    ],
)
def test_bad_input_is_refused_and_nothing_is_stored(region, dupont, chu_clerk, values):
    with pytest.raises(InvalidInput):
        record(dupont, region.chu, chu_clerk, **values)
    assert Directive.objects.count() == DirectiveVersion.objects.count() == 0
    assert Evidence.objects.count() == 0
    assert not AuditEvent.objects.filter(code=EventCode.CONSENT_RECORD).exists()


def test_evidence_too_large_is_refused(region, dupont, chu_clerk):
    with override_settings(RELAIS_CONSENT_EVIDENCE_MAX_BYTES=1024), pytest.raises(InvalidInput):
        record(dupont, region.chu, chu_clerk, evidence=PDF)
    assert Evidence.objects.count() == 0


def test_evidence_is_encrypted_at_rest_and_bound_to_its_hash(region, dupont, chu_clerk):
    stored = record(dupont, region.chu, chu_clerk, evidence=PDF).evidence
    ciphertext = bytes(stored.ciphertext)
    assert b"signed form" not in ciphertext
    assert stored.content_type == "application/pdf"
    sealed = Sealed(
        stored.sha256, stored.content_type, stored.size, bytes(stored.nonce), ciphertext
    )
    assert unseal(sealed, key_path=settings.RELAIS_EVIDENCE_KEY_PATH) == PDF
    tampered = Sealed("0" * 64, stored.content_type, stored.size, bytes(stored.nonce), ciphertext)
    with pytest.raises(InvalidTag):
        unseal(tampered, key_path=settings.RELAIS_EVIDENCE_KEY_PATH)


def test_directives_follow_the_patient_through_links_and_stay_with_their_identifier_on_unlink(
    region, dupont, chu_clerk, referring_doctor
):
    at_chu = record(dupont, region.chu, chu_clerk)  # under CHU1
    at_pm = record(
        dupont, region.portmael, referring_doctor, kind="mask", scope="study", value=study_uid(2)
    )  # under PM1
    # Linked: the patient's directives, wherever recorded, hold for her everywhere.
    assert {d.id for d in policy_directives(patient=dupont)} == {
        at_chu.directive_id,
        at_pm.directive_id,
    }
    detached = patient_unlink(
        identifier=PatientIdentifier.objects.get(value="PM1"),
        actor=SYSTEM,
        now=NOW,
        comment="two different people",
    )
    assert {d.id for d in policy_directives(patient=dupont)} == {at_chu.directive_id}
    assert {d.id for d in policy_directives(patient=detached)} == {at_pm.directive_id}


def _outside(patient, now=NOW):
    return consent_evaluate(
        patient=patient,
        requester=policy.Requester("10000000009", "290000012"),
        relationship=policy.Relationship.NONE,
        purpose=policy.Purpose.AVIS,
        studies=(policy.StudyRef("1.2.3", "350000014"),),
        now=now,
    )


def test_the_evaluation_reads_the_directives_as_committed_or_as_recorded_then(
    region, dupont, chu_clerk
):
    assert not _outside(dupont).permit  # outside the care team: no consent yet
    granted = record(
        dupont,
        region.chu,
        chu_clerk,
        kind="consent",
        scope="institution",
        value="290000012",
        note="formulaire signé en consultation",
    )
    decision = _outside(dupont)
    assert decision.permit
    assert (decision.reasons[0].directive_id, decision.reasons[0].directive_version) == (
        granted.directive_id,
        1,
    )
    later = NOW + dt.timedelta(days=10)
    directive_withdraw(
        directive=granted.directive,
        institution=region.chu,
        recorder=chu_clerk,
        actor=SYSTEM,
        now=later,
    )
    assert not _outside(dupont, now=later).permit
    # A DPO looking back at a decision of the day after: the consent as it stood then.
    then = NOW + dt.timedelta(days=1)
    looked_back = consent_evaluate(
        patient=dupont,
        requester=policy.Requester("10000000009", "290000012"),
        relationship=policy.Relationship.NONE,
        purpose=policy.Purpose.AVIS,
        studies=(policy.StudyRef("1.2.3", "350000014"),),
        now=then,
        as_recorded_at=then,
    )
    assert looked_back.permit
    assert looked_back.reasons[0].directive_version == 1


def test_a_change_that_widens_sharing_needs_its_grounds(region, dupont, chu_clerk):
    with pytest.raises(InvalidInput) as consent_without_grounds:
        record(dupont, region.chu, chu_clerk, kind="consent", scope="all")
    assert consent_without_grounds.value.code == "consent:directive:no-grounds"
    opposed = record(dupont, region.chu, chu_clerk)  # restricting needs no form
    with pytest.raises(InvalidInput):
        directive_withdraw(
            directive=opposed.directive,
            institution=region.chu,
            recorder=chu_clerk,
            actor=SYSTEM,
            now=NOW,
        )
    assert directive_withdraw(
        directive=opposed.directive,
        institution=region.chu,
        recorder=chu_clerk,
        evidence=PDF,
        actor=SYSTEM,
        now=NOW,
    ).withdrawn


def test_a_directive_names_a_known_professional_and_a_registered_study(region, dupont, chu_clerk):
    from broker.models import Professional

    with pytest.raises(InvalidInput, match="RPPS"):
        record(dupont, region.chu, chu_clerk, scope="professional", value="10000000001")
    Professional.objects.filter(user=chu_clerk).update(rpps="10000000001")
    assert record(dupont, region.chu, chu_clerk, scope="professional", value="10000000001")
    with pytest.raises(InvalidInput, match="no registered study"):
        record(dupont, region.chu, chu_clerk, kind="mask", scope="study", value="1.2.999")
    assert record(dupont, region.chu, chu_clerk, kind="mask", scope="study", value=study_uid(1))


def test_withdrawing_a_consent_signals_a_restriction_withdrawing_an_opposition_does_not(
    region, dupont, chu_clerk, django_capture_on_commit_callbacks
):
    received = []
    consent_restricted.connect(lambda **kw: received.append(kw), weak=False, dispatch_uid="w")
    try:
        granted = record(dupont, region.chu, chu_clerk, kind="consent", scope="all", note="oral")
        opposed = record(dupont, region.chu, chu_clerk)
        received.clear()
        for directive in (granted.directive, opposed.directive):
            with django_capture_on_commit_callbacks(execute=True):
                directive_withdraw(
                    directive=directive,
                    institution=region.chu,
                    recorder=chu_clerk,
                    note="à la demande de la patiente",
                    actor=SYSTEM,
                    now=NOW,
                )
    finally:
        consent_restricted.disconnect(dispatch_uid="w")
    assert [(r["directive_id"], r["version"]) for r in received] == [(granted.directive_id, 2)]


def test_a_directive_recorded_before_a_link_holds_for_the_linked_patient(
    region, chu_clerk, referring_doctor
):
    """Recorded under Port-Maël's IPP for a patient known only there; her CHU record is
    then linked by her INS: the opposition holds when the CHU's doctors ask."""
    manifest_register(
        data=kos_for(region.portmael, "PM7", study=7, ins=NIR),
        institution=region.portmael,
        actor=SYSTEM,
        now=NOW,
    )
    alone = PatientIdentifier.objects.get(value="PM7").patient
    record(alone, region.portmael, referring_doctor)
    manifest_register(
        data=kos_for(region.chu, "CHU7", study=8, ins=NIR),
        institution=region.chu,
        actor=SYSTEM,
        now=NOW,
    )
    linked = PatientIdentifier.objects.get(value="CHU7").patient
    assert linked == PatientIdentifier.objects.get(value="PM7").patient
    decision = consent_evaluate(
        patient=linked,
        requester=policy.Requester("10000000002", region.chu.finess),
        relationship=policy.Relationship.CARE_TEAM,
        purpose=policy.Purpose.TREATMENT,
        studies=(policy.StudyRef(study_uid(8), region.chu.finess),),
        now=NOW,
    )
    assert not decision.permit
    assert decision.rule is policy.Rule.OPPOSITION


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_withdrawal_waits_for_a_token_being_issued_and_then_restricts_it(
    region, dupont, chu_clerk
):
    """A issues a token: it decides (permit) and holds its transaction open; B withdraws the
    consent meanwhile; C decides after. B must wait for A's commit (so its restriction signal
    reaches a token that exists), and C must see the withdrawal."""
    import threading
    import time

    from django.db import connection, transaction

    from consent.services import consent_decide_for_issuance

    granted = record(dupont, region.chu, chu_clerk, kind="consent", scope="all", note="oral")
    timeline: list[tuple[str, float]] = []
    decisions: dict[str, bool] = {}
    signalled: list[float] = []

    def on_restriction(**kwargs):
        signalled.append(time.monotonic())

    def issue(name: str, delay: float, hold: float) -> None:
        try:
            time.sleep(delay)
            with transaction.atomic():
                decision = consent_decide_for_issuance(
                    patient=dupont,
                    requester=policy.Requester("10000000009", "290000012"),
                    relationship=policy.Relationship.NONE,
                    purpose=policy.Purpose.AVIS,
                    studies=(policy.StudyRef("1.2.3", "350000014"),),
                    now=NOW,
                )
                decisions[name] = decision.permit
                time.sleep(hold)  # the token is written here
            timeline.append((f"{name} committed", time.monotonic()))
        finally:
            connection.close()

    def withdraw() -> None:
        try:
            time.sleep(0.1)
            directive_withdraw(
                directive=granted.directive,
                institution=region.chu,
                recorder=chu_clerk,
                actor=SYSTEM,
                now=NOW,
            )
            timeline.append(("withdrawal committed", time.monotonic()))
        finally:
            connection.close()

    consent_restricted.connect(on_restriction, weak=False, dispatch_uid="race")
    try:
        threads = [
            threading.Thread(target=issue, args=("A", 0, 0.5)),
            threading.Thread(target=withdraw),
            threading.Thread(target=issue, args=("C", 0.25, 0)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        consent_restricted.disconnect(dispatch_uid="race")
    order = [name for name, _ in sorted(timeline, key=lambda item: item[1])]
    assert decisions == {"A": True, "C": False}
    assert order.index("A committed") < order.index("withdrawal committed")
    (restricted_at,) = signalled
    assert restricted_at >= dict(timeline)["A committed"]
