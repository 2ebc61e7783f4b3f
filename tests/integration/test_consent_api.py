"""The consent REST interface, as clerks, doctors, the DPO and outsiders use it."""

from __future__ import annotations

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile

from audit.events import EventCode
from audit.models import AuditEvent
from broker.models import PatientIdentifier, Role
from broker.registration import manifest_register
from consent.models import Directive
from tests.conftest import NOW, SYSTEM, Region, client_for, make_user
from tests.dicom_factories import NIR
from tests.registry_helpers import kos_for

pytestmark = pytest.mark.django_db

PDF = b"%PDF-1.7\n% a signed form\n%%EOF\n"


@pytest.fixture
def chu_clerk(region: Region):
    return make_user("clerk.chu", [(region.chu, Role.ADMISSIONS_CLERK)])


@pytest.fixture
def patient(region: Region):
    for institution, ipp, study in ((region.chu, "CHU1", 1), (region.portmael, "PM1", 2)):
        manifest_register(
            data=kos_for(institution, ipp, study=study, ins=NIR),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    return PatientIdentifier.objects.get(value="CHU1").patient


def url(patient, suffix="directives"):
    return f"/api/v1/patients/{patient.public_id}/{suffix}"


def test_a_clerk_records_lists_and_withdraws_a_directive(region, patient, chu_clerk):
    client = client_for(chu_clerk)
    created = client.post(
        url(patient),
        {
            "institution": region.chu.finess,
            "kind": "consent",
            "scope": "institution",
            "value": region.staubin.finess,
            "purposes": ["avis"],
            "valid_until": "2027-11-28T00:00:00Z",
            "note": "formulaire signé, scanné",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert created.json()["version"] == 1
    directive = created.json()["directive"]

    amended = client.post(
        url(patient, f"directives/{directive}/amend"),
        {
            "institution": region.chu.finess,
            "scope": "institution",
            "value": region.staubin.finess,
            "purposes": ["avis", "treatment"],
            "valid_until": "2028-11-28T00:00:00Z",
            "note": "étendu au traitement, à sa demande",
        },
        format="json",
    )
    assert amended.status_code == 201, amended.json()
    assert amended.json()["version"] == 2

    withdrawn = client.post(
        url(patient, f"directives/{directive}/withdraw"),
        {"institution": region.chu.finess, "note": "retrait oral"},
        format="json",
    )
    assert withdrawn.status_code == 201
    (listed,) = client.get(url(patient)).json()["results"]
    assert listed["current"]["withdrawn"] is True
    assert [v["version"] for v in listed["history"]] == [1, 2, 3]
    assert listed["history"][0]["purposes"] == ["avis"]
    assert listed["history"][1]["purposes"] == ["avis", "treatment"]
    assert listed["current"]["valid_until"].startswith("2028-11-28")
    assert AuditEvent.objects.filter(code=EventCode.CONSENT_AMEND).count() == 1
    # A withdrawn directive is not amended any more.
    again = client.post(
        url(patient, f"directives/{directive}/amend"),
        {"institution": region.chu.finess, "scope": "all", "note": "x"},
        format="json",
    )
    assert again.status_code == 409


def test_evidence_is_uploaded_as_a_file_and_checked(region, patient, chu_clerk):
    client = client_for(chu_clerk)
    form = {"institution": region.chu.finess, "kind": "opposition", "scope": "all"}
    ok = client.post(
        url(patient),
        {**form, "evidence": SimpleUploadedFile("form.pdf", PDF, "application/pdf")},
        format="multipart",
    )
    assert ok.status_code == 201, ok.json()
    assert len(ok.json()["evidence_sha256"]) == 64
    refused = client.post(
        url(patient),
        {**form, "evidence": SimpleUploadedFile("form.pdf", b"GIF89a...", "application/pdf")},
        format="multipart",
    )
    assert refused.status_code == 400
    assert refused["Content-Type"] == "application/problem+json"
    assert refused.json()["code"] == "consent:evidence:refused"
    assert Directive.objects.count() == 1


def test_bad_input_is_a_problem_and_changes_nothing(region, patient, chu_clerk):
    client = client_for(chu_clerk)
    reversed_dates = client.post(
        url(patient),
        {
            "institution": region.chu.finess,
            "kind": "opposition",
            "scope": "all",
            "valid_from": "2026-12-01T00:00:00Z",
            "valid_until": "2026-11-01T00:00:00Z",
        },
        format="json",
    )
    assert reversed_dates.status_code == 400
    assert reversed_dates.json()["code"] == "consent:directive:dates-reversed"
    unknown = client.post(
        url(patient),
        {"institution": "999999999", "kind": "opposition", "scope": "all"},
        format="json",
    )
    assert unknown.status_code == 404
    elsewhere = client.post(
        url(patient),
        {"institution": region.staubin.finess, "kind": "opposition", "scope": "all"},
        format="json",
    )
    assert elsewhere.status_code == 403
    assert Directive.objects.count() == 0


def test_outsiders_and_unrelated_staff_see_nothing(patient, outsider, clerk, chu_clerk):
    assert client_for(outsider).get(url(patient)).status_code == 404
    assert client_for(clerk).get(url(patient)).status_code == 404  # Saint-Aubin: unknown there
    assert client_for(chu_clerk).get(url(patient)).status_code == 200


def test_the_dpo_diagnoses_a_decision_and_exports_the_consent_state(
    region, patient, chu_clerk, dpo, referring_doctor
):
    client_for(chu_clerk).post(
        url(patient),
        {"institution": region.chu.finess, "kind": "opposition", "scope": "all"},
        format="json",
    )
    question = {
        "professional": "10000000001",
        "institution": region.portmael.finess,
        "relationship": "care_team",
        "purpose": "treatment",
        "studies": [{"study_instance_uid": "1.2.3", "source_institution": region.chu.finess}],
    }
    answer = client_for(dpo).post(url(patient, "consent/evaluate"), question, format="json")
    assert answer.status_code == 200, answer.json()
    body = answer.json()
    assert body["permit"] is False
    assert body["rule"] == "consent:opposition"
    assert body["reasons"][0]["directive"] is not None
    assert AuditEvent.objects.filter(code=EventCode.CONSENT_EVALUATE).count() == 1
    # A doctor is no DPO: the diagnosis is not theirs.
    refused = client_for(referring_doctor).post(
        url(patient, "consent/evaluate"), question, format="json"
    )
    assert refused.status_code == 404

    export = client_for(dpo).get(url(patient, "consent"))
    reads = AuditEvent.objects.filter(code=EventCode.CONSENT_READ)
    assert [e.details["read"] for e in reads] == ["export"]
    assert export.status_code == 200
    state = export.json()
    assert state["outside_care_team"] == "opt-in"
    assert set(state["policies"]) == {"opposition", "consent", "mask"}
    assert state["directives"][0]["current"]["kind"] == "opposition"
    assert state["directives"][0]["policy_oid"] == state["policies"]["opposition"]


def test_an_unknown_patient_and_oversized_evidence_are_refused(region, patient, chu_clerk):
    import uuid

    from django.test import override_settings

    client = client_for(chu_clerk)
    assert client.get(f"/api/v1/patients/{uuid.uuid4()}/directives").status_code == 404
    with override_settings(RELAIS_CONSENT_EVIDENCE_MAX_BYTES=16):
        big = client.post(
            url(patient),
            {
                "institution": region.chu.finess,
                "kind": "opposition",
                "scope": "all",
                "evidence": SimpleUploadedFile("form.pdf", PDF, "application/pdf"),
            },
            format="multipart",
        )
    assert big.status_code == 400
    assert big.json()["code"] == "consent:evidence:refused"
    assert Directive.objects.count() == 0
