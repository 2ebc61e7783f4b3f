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
from tests.registry_helpers import kos_for

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
        dupont, region.portmael, referring_doctor, kind="mask", scope="study", value="1.2.3"
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


def test_the_evaluation_reads_the_directives_as_committed(region, dupont, chu_clerk):
    assert not _outside(dupont).permit  # outside the care team: no consent yet
    granted = record(
        dupont, region.chu, chu_clerk, kind="consent", scope="institution", value="290000012"
    )
    decision = _outside(dupont)
    assert decision.permit
    assert (decision.reasons[0].directive_id, decision.reasons[0].directive_version) == (
        granted.directive_id,
        1,
    )
    directive_withdraw(
        directive=granted.directive,
        institution=region.chu,
        recorder=chu_clerk,
        actor=SYSTEM,
        now=NOW,
    )
    assert not _outside(dupont).permit


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_no_permit_is_evaluated_after_a_withdrawal_has_committed(region, dupont, chu_clerk):
    """Threads evaluate while one withdraws: every evaluation begun after the withdrawal's
    commit denies."""
    import threading
    import time

    from django.db import connection

    granted = record(dupont, region.chu, chu_clerk, kind="consent", scope="all")
    committed_at: list[float] = []
    results: list[tuple[float, bool]] = []
    stop = threading.Event()

    def evaluate_in_a_loop() -> None:
        try:
            while not stop.is_set():
                started = time.monotonic()
                results.append((started, _outside(dupont).permit))
        finally:
            connection.close()

    def withdraw() -> None:
        try:
            time.sleep(0.05)
            directive_withdraw(
                directive=granted.directive,
                institution=region.chu,
                recorder=chu_clerk,
                actor=SYSTEM,
                now=NOW,
            )
            committed_at.append(time.monotonic())
        finally:
            connection.close()

    threads = [threading.Thread(target=evaluate_in_a_loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    withdrawer = threading.Thread(target=withdraw)
    withdrawer.start()
    withdrawer.join()
    time.sleep(0.1)
    stop.set()
    for thread in threads:
        thread.join()
    (commit,) = committed_at
    before = [permit for started, permit in results if started < commit]
    after = [permit for started, permit in results if started > commit]
    assert any(before), "some evaluations ran, and permitted, before the withdrawal"
    assert after, "some evaluations ran after it"
    assert not any(after)
