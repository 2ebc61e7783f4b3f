"""Sharing over REST: tickets, tokens, introspection, Orthanc's contract, and the access
matrix (every role against every kind of object owned by another party)."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any
from urllib.parse import urlencode

import pytest
from django.utils import timezone

from audit.events import EventCode
from audit.models import AuditEvent
from broker.models import PatientIdentifier, Role
from broker.registration import manifest_register
from sharing import services
from sharing.models import AccessRequest, DutyShift, EmergencyReview, IssuedToken, RequestState
from tests.conftest import NOW, SYSTEM, Region, client_for, make_user, system_client
from tests.dicom_factories import NIR
from tests.registry_helpers import kos_for, study_uid

pytestmark = pytest.mark.django_db


def introspect(client, token):
    """RFC 7662: a form-encoded POST."""
    return client.post(
        "/api/v1/tokens/introspect",
        urlencode({"token": token}),
        content_type="application/x-www-form-urlencoded",
    )


CHU_STUDY, PM_STUDY = study_uid(1), study_uid(2)
JUSTIFICATION = "Polytraumatisé inconscient, bilan lésionnel en urgence absolue."


@pytest.fixture
def dupont(region: Region):
    for institution, ipp, study in ((region.chu, "CHU1", 1), (region.portmael, "PM1", 2)):
        manifest_register(
            data=kos_for(institution, ipp, study=study, ins=NIR),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    return PatientIdentifier.objects.get(value="CHU1").patient


def test_a_ticket_from_request_to_token_over_rest(region, dupont, referring_doctor):
    doctor = client_for(referring_doctor)
    created = doctor.post(
        "/api/v1/requests",
        {
            "purpose": "treatment",
            "patient": str(dupont.public_id),
            "studies": [CHU_STUDY],
            "justification": "bilan pré-opératoire",
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    ticket = created.json()
    assert ticket["state"] == "approved"
    assert ticket["requester_institution"] == region.portmael.finess
    issued = doctor.post(f"/api/v1/requests/{ticket['id']}/tokens", {}, format="json")
    assert issued.status_code == 201
    assert issued["Cache-Control"] == "no-store"
    body = issued.json()
    assert body["token_type"] == "Bearer"
    assert 0 < body["expires_in"] <= 900
    assert body["studies"] == [CHU_STUDY]
    token = body["access_token"]
    # The archive asks Relais, with its API key (or Basic FINESS:key).
    archive = system_client(region, region.chu)
    answer = introspect(archive, token)
    assert answer.status_code == 200
    assert answer.json()["active"] is True
    assert answer.json()["studies"] == [CHU_STUDY]
    basic = base64.b64encode(f"{region.chu.finess}:{region.keys[region.chu.finess]}".encode())
    orthanc = client_for(None)
    orthanc.force_authenticate(None)
    orthanc.credentials(HTTP_AUTHORIZATION=f"Basic {basic.decode()}")
    grant = orthanc.post(
        "/api/v1/orthanc/tokens/validate",
        {"dicom-uid": CHU_STUDY, "level": "study", "method": "get", "token-value": token},
        format="json",
    )
    assert grant.json() == {"granted": True, "validity": 1}
    story = doctor.get(f"/api/v1/requests/{ticket['id']}/story").json()["results"]
    codes = [e["code"] for e in story]
    assert codes[:4] == [
        "sharing:request:create",
        "sharing:request:approve",
        "sharing:access:decide",
        "sharing:token:issue",
    ]
    assert "sharing:token:introspect" in codes
    # Revoked by its holder: inactive at once for introspection.
    revoked = doctor.post(
        "/api/v1/tokens/revoke", {"token": token, "reason": "fin de consultation"}, format="json"
    )
    assert revoked.status_code == 204
    assert introspect(archive, token).json() == {"active": False}


def test_introspection_needs_an_institution_system(region, dupont, referring_doctor):
    assert (
        client_for(referring_doctor).post("/api/v1/tokens/introspect", {"token": "x"}).status_code
        == 403
    )
    anonymous = client_for(None)
    anonymous.force_authenticate(None)
    assert introspect(anonymous, "x").status_code == 401
    bad = base64.b64encode(f"{region.portmael.finess}:{region.keys[region.chu.finess]}".encode())
    anonymous.credentials(HTTP_AUTHORIZATION=f"Basic {bad.decode()}")  # another's key
    assert introspect(anonymous, "x").status_code == 401
    assert AuditEvent.objects.filter(code=EventCode.API_KEY_REFUSED).count() == 1


def test_bad_input_is_a_problem_and_stores_nothing(region, dupont, referring_doctor):
    doctor = client_for(referring_doctor)
    for body in (
        {"purpose": "research", "patient": str(dupont.public_id), "justification": "x"},
        {"purpose": "treatment", "patient": "not-a-uuid", "justification": "x"},
        {
            "purpose": "treatment",
            "patient": str(dupont.public_id),
            "studies": ["1.2.3"],
            "justification": "x",
        },
        {
            "purpose": "avis",
            "patient": str(dupont.public_id),
            "studies": [PM_STUDY],
            "justification": "x",
            "question": "?",
        },
        {
            "purpose": "avis",
            "patient": str(dupont.public_id),
            "studies": [PM_STUDY],
            "justification": "x",
            "question": "?",
            "recipient": "99999999999",
        },
    ):
        answer = doctor.post("/api/v1/requests", body, format="json")
        assert answer.status_code == 400, (body, answer.json())
        assert answer["Content-Type"] == "application/problem+json"
    assert not AccessRequest.objects.exists()


def test_break_the_glass_over_rest(region, dupont, dpo):
    urgentist = make_user("dr.sau", [(region.chu, Role.EMERGENCY_DOCTOR)])
    doctor = client_for(urgentist)
    short = doctor.post(
        "/api/v1/emergency",
        {"patient": str(dupont.public_id), "justification": "urgent"},
        format="json",
    )
    assert short.status_code == 400
    assert short.json()["code"] == "sharing:emergency:justification"
    started = doctor.post(
        "/api/v1/emergency",
        {"patient": str(dupont.public_id), "justification": JUSTIFICATION},
        format="json",
    )
    assert started.status_code == 201
    ticket = started.json()
    assert ticket["purpose"] == "emergency"
    assert (
        doctor.post(f"/api/v1/requests/{ticket['id']}/tokens", {}, format="json").status_code == 201
    )
    reviews = client_for(dpo).get("/api/v1/emergency/reviews").json()["results"]
    assert [r["ticket"]["id"] for r in reviews] == [ticket["id"]]
    done = client_for(dpo).post(
        f"/api/v1/emergency/reviews/{reviews[0]['id']}",
        {"outcome": "justified"},
        format="json",
    )
    assert done.status_code == 200
    assert done.json()["reviewed_by"] == "dpo.chu"


def test_duty_shifts_over_rest(region):
    admin = make_user("admin.chu", [(region.chu, Role.INSTITUTION_ADMIN)])
    tele = make_user("dr.tele", [(region.staubin, Role.TELERADIOLOGIST)])
    tele.professional.rpps = "10000000042"
    tele.professional.save()
    now = timezone.now()
    body = {
        "teleradiologist": "10000000042",
        "institutions": [region.chu.finess],
        "starts_at": now.isoformat(),
        "ends_at": (now + dt.timedelta(hours=12)).isoformat(),
        "agreement_reference": "CONV-2026-12",
    }
    created = client_for(admin).post("/api/v1/duty-shifts", body, format="json")
    assert created.status_code == 201, created.json()
    assert client_for(tele).post("/api/v1/duty-shifts", body, format="json").status_code == 403
    listed = client_for(admin).get("/api/v1/duty-shifts").json()["results"]
    assert [s["id"] for s in listed] == [created.json()["id"]]
    cancelled = client_for(admin).post(f"/api/v1/duty-shifts/{created.json()['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["cancelled_by"] == "admin.chu"


# ---------------------------------------------------------------------------
# The access matrix


@pytest.fixture
def world(region, dupont, referring_doctor, radiologist):
    """Objects of other parties: Port-Maël's doctor's approved ticket and its token, his
    pending avis to the CHU's radiologist, a break-the-glass of Port-Maël's urgentist under
    review, and a CHU duty shift of another teleradiologist."""
    actor = SYSTEM
    treatment = services.request_create(
        user=referring_doctor,
        purpose="treatment",
        patient=dupont,
        institution=region.portmael,
        studies=[CHU_STUDY],
        justification="suivi",
        actor=actor,
        now=timezone.now(),
    )
    _, issued = services.token_issue_for_ticket(
        user=referring_doctor, ticket=treatment, actor=actor, now=timezone.now()
    )
    avis = services.request_create(
        user=referring_doctor,
        purpose="avis",
        patient=dupont,
        institution=region.portmael,
        studies=[PM_STUDY],
        justification="avis",
        question="?",
        recipient=radiologist.professional,
        actor=actor,
        now=timezone.now(),
    )
    urgentist = make_user("dr.pm.sau", [(region.portmael, Role.EMERGENCY_DOCTOR)])
    emergency = services.emergency_start(
        user=urgentist,
        patient=dupont,
        institution=region.portmael,
        justification=JUSTIFICATION,
        actor=actor,
        now=timezone.now(),
    )
    chu_admin = make_user("admin.chu", [(region.chu, Role.INSTITUTION_ADMIN)])
    other_tele = make_user("dr.tele.other", [(region.staubin, Role.TELERADIOLOGIST)])
    shift = services.shift_create(
        user=chu_admin,
        teleradiologist=other_tele.professional,
        institutions=[region.chu],
        starts_at=timezone.now() - dt.timedelta(minutes=30),
        ends_at=timezone.now() + dt.timedelta(hours=8),
        agreement_reference="CONV-X",
        actor=actor,
        now=timezone.now(),
    )
    return {
        "treatment": treatment,
        "token": issued,
        "avis": avis,
        "emergency": emergency,
        "review": EmergencyReview.objects.get(request=emergency),
        "shift": shift,
    }


def _personas(region: Region, persona: str) -> Any:
    if persona == "outsider":
        return make_user("outsider")
    if persona == "other_doctor":
        return make_user("dr.aubin", [(region.staubin, Role.REFERRING_DOCTOR)])
    if persona in ("tele_on_shift", "tele_off_shift"):
        user = make_user(f"dr.{persona}", [(region.staubin, Role.TELERADIOLOGIST)])
        if persona == "tele_on_shift":
            DutyShift.objects.create(
                teleradiologist=user.professional,
                starts_at=timezone.now() - dt.timedelta(hours=1),
                ends_at=timezone.now() + dt.timedelta(hours=1),
                agreement_reference="CONV-Y",
                created_by="test",
                created_at=timezone.now(),
            ).institutions.set([region.chu, region.portmael])
        return user
    if persona == "emergency_doctor":
        return make_user("dr.sau.aubin", [(region.staubin, Role.EMERGENCY_DOCTOR)])
    if persona == "clerk":
        return make_user("clerk.aubin", [(region.staubin, Role.ADMISSIONS_CLERK)])
    if persona == "administrator":
        return make_user("admin.aubin", [(region.staubin, Role.INSTITUTION_ADMIN)])
    if persona == "dpo":
        return make_user("dpo.aubin", [(region.staubin, Role.DPO)])
    if persona == "region_admin_not_clinician":
        return None
    raise AssertionError(persona)


PERSONAS = [
    "other_doctor",
    "tele_on_shift",
    "tele_off_shift",
    "emergency_doctor",
    "clerk",
    "administrator",
    "dpo",
    "outsider",
]


@pytest.mark.parametrize("persona", PERSONAS)
def test_access_matrix_no_unexpected_success(region, world, persona):
    user = _personas(region, persona)
    client = client_for(user)
    treatment, avis, emergency = world["treatment"], world["avis"], world["emergency"]
    review, shift, issued = world["review"], world["shift"], world["token"]
    others = {str(t.public_id) for t in (treatment, avis, emergency)}
    refused = [
        ("get", f"/api/v1/requests/{treatment.public_id}", None),
        ("get", f"/api/v1/requests/{emergency.public_id}/story", None),
        ("post", f"/api/v1/requests/{avis.public_id}/approve", {}),
        ("post", f"/api/v1/requests/{avis.public_id}/deny", {"note": "non"}),
        ("post", f"/api/v1/requests/{avis.public_id}/answer", {"answer": "réponse"}),
        ("post", f"/api/v1/requests/{treatment.public_id}/cancel", {}),
        ("post", f"/api/v1/requests/{treatment.public_id}/revoke", {"reason": "x"}),
        ("post", f"/api/v1/requests/{treatment.public_id}/tokens", {}),
        ("post", f"/api/v1/requests/{emergency.public_id}/tokens", {}),
        ("post", f"/api/v1/requests/{emergency.public_id}/cancel", {}),
        ("post", f"/api/v1/emergency/reviews/{review.pk}", {"outcome": "justified"}),
        ("post", f"/api/v1/duty-shifts/{shift.public_id}/cancel", {}),
        ("post", "/api/v1/tokens/revoke", {"jti": str(issued.token_id), "reason": "x"}),
        ("post", "/api/v1/tokens/introspect", {"token": "x"}),
        ("post", "/api/v1/orthanc/tokens/validate", {"token-value": "x"}),
    ]
    for method, url, body in refused:
        answer = getattr(client, method)(url, body, format="json")
        assert answer.status_code in (401, 403, 404), (persona, url, answer.status_code)
    # Lists answer, but hold nothing of the others'.
    for url in ("/api/v1/requests", "/api/v1/inbox"):
        listed = client.get(url)
        assert listed.status_code == 200
        assert not {t["id"] for t in listed.json()["results"]} & others, (persona, url)
    reviews = client.get("/api/v1/emergency/reviews")
    assert reviews.status_code in (403, 404) or reviews.json()["results"] == []
    shifts = client.get("/api/v1/duty-shifts")
    assert shifts.status_code in (403, 404) or str(shift.public_id) not in str(shifts.json())
    # Nothing changed.
    for ticket, state in ((treatment, "approved"), (avis, "pending"), (emergency, "approved")):
        ticket.refresh_from_db()
        assert ticket.state == state
    assert IssuedToken.objects.filter(revoked_at__isnull=False).count() == 0
    assert IssuedToken.objects.count() == 1
    shift.refresh_from_db()
    review.refresh_from_db()
    assert shift.cancelled_at is None
    assert review.reviewed_at is None


def test_the_owners_do_succeed_in_the_matrix_world(region, world, referring_doctor, radiologist):
    """The matrix's refusals are not an artefact: the parties themselves succeed."""
    treatment, avis = world["treatment"], world["avis"]
    assert (
        client_for(referring_doctor).get(f"/api/v1/requests/{treatment.public_id}").status_code
        == 200
    )
    assert (
        client_for(referring_doctor)
        .post(f"/api/v1/requests/{treatment.public_id}/tokens", {}, format="json")
        .status_code
        == 201
    )
    assert (
        client_for(radiologist)
        .post(f"/api/v1/requests/{avis.public_id}/approve", {}, format="json")
        .status_code
        == 200
    )
    assert (
        client_for(radiologist)
        .post(f"/api/v1/requests/{avis.public_id}/answer", {"answer": "RAS"}, format="json")
        .status_code
        == 200
    )
    avis.refresh_from_db()
    assert avis.state == RequestState.EXPIRED  # an avis ends with its answer
    assert avis.answer == "RAS"


def test_odd_input_is_refused_without_a_500(region, dupont, referring_doctor):
    odd = client_for(None)
    odd.force_authenticate(None)
    odd.credentials(HTTP_AUTHORIZATION="Basic w6k=")  # "é"
    assert introspect(odd, "x").status_code == 401
    odd.credentials(HTTP_AUTHORIZATION="Basic é")
    assert introspect(odd, "x").status_code == 401
    doctor = client_for(referring_doctor)
    revoked = doctor.post("/api/v1/tokens/revoke", {"token": "é.é.é", "reason": "x"}, format="json")
    assert revoked.status_code == 404
    ticket = services.request_create(
        user=referring_doctor,
        purpose="treatment",
        patient=dupont,
        institution=region.portmael,
        studies=[CHU_STUDY],
        justification="suivi",
        actor=SYSTEM,
        now=timezone.now(),
    )
    empty = doctor.post(
        f"/api/v1/requests/{ticket.public_id}/tokens", {"studies": []}, format="json"
    )
    assert empty.status_code == 400
    assert introspect(system_client(region, region.chu), "jeton-é").json() == {"active": False}
