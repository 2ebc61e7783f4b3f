"""The registry's REST API through the eyes of its callers (personas)."""

from __future__ import annotations

import datetime as dt

import pytest

from audit.events import EventCode
from audit.models import AuditEvent
from broker.dicom.kos import normalise_ins_matricule
from broker.models import Institution, Manifest, Patient
from broker.services import manifest_register
from tests.conftest import NOW, SYSTEM, client_for, system_client
from tests.registry_helpers import kos_for, study_uid

DICOM = "application/dicom"
INS = "2850375123456"
INS_FULL = normalise_ins_matricule(INS)  # stored with its key


def publish(client, data, content_type=DICOM):
    return client.post("/api/v1/manifests", data=data, content_type=content_type)


def assert_problem(response, status, code=None):
    assert response.status_code == status, response.content
    assert response["Content-Type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    assert body["type"]
    if code:
        assert body["code"] == code
    return body


# ---------------------------------------------------------------------------
# Publishing


def test_an_institution_system_publishes_a_manifest(region):
    response = publish(system_client(region, region.chu), kos_for(region.chu, "100001", study=1))

    assert response.status_code == 201, response.content
    body = response.json()
    assert body["outcome"] == "new"
    assert body["study_instance_uid"] == study_uid(1)
    assert body["source_institution"] == region.chu.finess
    assert body["source_patient_id"] == {"issuer": "CHU-BELLECOMBE", "value": "100001"}
    assert len(body["series"]) == 1
    assert response["Location"].endswith(body["sop_instance_uid"])


def test_publishing_the_same_manifest_again_answers_200_unchanged(region):
    client = system_client(region, region.chu)
    data = kos_for(region.chu, "100001", study=1)
    publish(client, data)

    response = publish(client, data)

    assert response.status_code == 200
    assert response.json()["outcome"] == "unchanged"
    assert Manifest.objects.count() == 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not dicom", None),
        (b"\0" * 128 + b"DICM" + b"\x02\x00", None),
    ],
    ids=["not-dicom", "truncated"],
)
def test_a_body_that_is_not_a_kos_gets_a_422_problem_and_only_an_audit_record(region, body, code):
    events_before = AuditEvent.objects.count()

    response = publish(system_client(region, region.chu), body)

    problem = assert_problem(response, 422)
    assert problem["code"].startswith("kos:")
    assert Manifest.objects.count() == 0
    assert Patient.objects.count() == 0
    assert AuditEvent.objects.count() == events_before + 1
    assert AuditEvent.objects.order_by("-sequence").first().code == EventCode.MANIFEST_REJECT


def test_a_dicom_object_that_is_not_a_kos_is_refused(region):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "100001"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)

    response = publish(system_client(region, region.chu), buffer.getvalue())

    assert_problem(response, 422, "kos:wrong-sop-class")


def test_a_manifest_under_another_institutions_issuer_is_refused(region):
    """The CHU's key cannot publish a Port-Maël patient."""
    data = kos_for(region.portmael, "PM-555", study=1)

    response = publish(system_client(region, region.chu), data)

    assert_problem(response, 422, "kos:unknown-issuer")
    assert Manifest.objects.count() == 0


def test_a_wrong_content_type_gets_415_and_an_audit_record(region):
    response = publish(system_client(region, region.chu), {"a": 1}, content_type="application/json")

    assert_problem(response, 415, "relais:request:unsupported-media-type")
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT).count() == 1


def test_a_manifest_larger_than_the_limit_is_refused(region, settings):
    settings.RELAIS_MAX_MANIFEST_BYTES = 100
    response = publish(system_client(region, region.chu), kos_for(region.chu, "100001", study=1))
    assert_problem(response, 422, "kos:too-large")


def test_an_unknown_api_key_gets_401_and_is_audited(region, api):
    api.credentials(HTTP_AUTHORIZATION="Api-Key abcdefgh.notarealkeyatall")

    response = publish(api, kos_for(region.chu, "100001", study=1))

    assert_problem(response, 401, "relais:auth:failed")
    assert response["WWW-Authenticate"] == "Api-Key"
    assert AuditEvent.objects.filter(code=EventCode.API_KEY_REFUSED).count() == 1


def test_anonymous_callers_get_401(region, api):
    assert_problem(api.get("/api/v1/manifests"), 401, "relais:auth:required")


def test_a_signed_in_user_cannot_publish(region, radiologist):
    response = publish(client_for(radiologist), kos_for(region.chu, "100001", study=1))
    assert_problem(response, 403, "registry:manifest:publisher-required")


# ---------------------------------------------------------------------------
# Querying


@pytest.fixture
def shared_patient(region):
    """Marie Dupont: known at the CHU and at Port-Maël, linked by her qualified INS."""
    for institution, pid, study in [
        (region.chu, "100001", 1),
        (region.chu, "100001", 2),
        (region.portmael, "PM-555", 3),
    ]:
        manifest_register(
            data=kos_for(institution, pid, study=study, ins=INS),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )
    manifest_register(
        data=kos_for(region.staubin, "SA-1", study=9, family="AUTRE", given="Paul"),
        institution=region.staubin,
        actor=SYSTEM,
        now=NOW,
    )
    return Patient.objects.get(identifiers__value="PM-555")


def test_a_clinician_finds_every_manifest_of_a_patient_by_any_identifier(
    region, shared_patient, referring_doctor
):
    client = client_for(referring_doctor)
    for issuer, value in [
        ("CH-PORTMAEL", "PM-555"),
        ("CHU-BELLECOMBE", "100001"),
        ("1.2.250.1.213.1.4.10", INS),
    ]:
        response = client.get("/api/v1/manifests", {"issuer": issuer, "patient_id": value})
        assert response.status_code == 200, response.content
        assert {m["study_instance_uid"] for m in response.json()["results"]} == {
            study_uid(1),
            study_uid(2),
            study_uid(3),
        }
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_QUERY).count() == 3
    event = AuditEvent.objects.filter(code=EventCode.MANIFEST_QUERY).last()
    assert event.patient_id == str(shared_patient.public_id)
    assert event.actor_username == "dr.martin"


def test_a_clinician_does_not_see_patients_unknown_at_their_institutions(
    region, shared_patient, referring_doctor
):
    response = client_for(referring_doctor).get(
        "/api/v1/manifests", {"issuer": "HOP-SAINTAUBIN", "patient_id": "SA-1"}
    )
    assert response.status_code == 200
    assert response.json()["results"] == []


def test_pages_follow_the_next_link(region, shared_patient, referring_doctor):
    client = client_for(referring_doctor)
    response = client.get("/api/v1/manifests", {"patient": shared_patient.public_id, "limit": 2})
    body = response.json()
    assert len(body["results"]) == 2
    assert body["next"]
    rest = client.get(body["next"]).json()
    assert len(rest["results"]) == 1
    assert rest["next"] is None


def test_a_bad_query_gets_a_400_problem(region, referring_doctor):
    client = client_for(referring_doctor)
    assert_problem(client.get("/api/v1/manifests", {"issuer": "X"}), 400, "relais:request:invalid")
    assert_problem(
        client.get("/api/v1/manifests", {"date_from": "2026-02-01", "date_to": "2026-01-01"}), 400
    )
    assert_problem(client.get("/api/v1/manifests", {"cursor": "@@@"}), 400, "relais:cursor:invalid")
    assert_problem(client.get("/api/v1/manifests", {"limit": 100000}), 400)


def test_an_institution_system_sees_only_what_it_published(region, shared_patient):
    response = system_client(region, region.portmael).get(
        "/api/v1/manifests", {"patient": shared_patient.public_id}
    )
    # The system cannot see the patient through /patients? It can: Port-Maël knows her.
    assert {m["study_instance_uid"] for m in response.json()["results"]} == {study_uid(3)}


def test_a_dpo_and_an_outsider_see_no_manifest(region, shared_patient, dpo, outsider):
    for user in (dpo, outsider):
        response = client_for(user).get("/api/v1/manifests")
        assert response.status_code == 200
        assert response.json()["results"] == []


def test_manifest_detail_answers_404_for_missing_and_for_not_yours(
    region, shared_patient, outsider, radiologist
):
    uid = Manifest.objects.get(study_instance_uid=study_uid(1)).sop_instance_uid
    missing = assert_problem(client_for(radiologist).get("/api/v1/manifests/1.2.3.999"), 404)
    hidden = assert_problem(client_for(outsider).get(f"/api/v1/manifests/{uid}"), 404)
    assert missing["code"] == hidden["code"] == "relais:object:not-found"
    mine = client_for(radiologist).get(f"/api/v1/manifests/{uid}")
    assert mine.status_code == 200
    assert mine.json()["patient"] == str(shared_patient.public_id)


def test_the_kos_document_is_returned_byte_for_byte(region, shared_patient, radiologist):
    manifest = Manifest.objects.get(study_instance_uid=study_uid(1))
    response = client_for(radiologist).get(f"/api/v1/manifests/{manifest.sop_instance_uid}/kos")
    assert response.status_code == 200
    assert response["Content-Type"] == DICOM
    assert response.content == bytes(manifest.kos_bytes)


def test_the_source_system_deprecates_its_manifest_and_others_cannot(region, shared_patient):
    manifest = Manifest.objects.get(study_instance_uid=study_uid(3))
    url = f"/api/v1/manifests/{manifest.sop_instance_uid}/deprecate"
    assert_problem(system_client(region, region.chu).post(url, {"reason": "x"}, format="json"), 404)

    response = system_client(region, region.portmael).post(
        url, {"reason": "deleted at source"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["status"] == "Deprecated"


# ---------------------------------------------------------------------------
# Patients and identity


def test_patient_lookup_by_any_identifier(region, shared_patient, clerk, referring_doctor):
    response = client_for(referring_doctor).get(
        "/api/v1/patients", {"issuer": "1.2.250.1.213.1.4.10", "value": INS}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == str(shared_patient.public_id)
    assert {i["value"] for i in body["identifiers"]} == {"100001", "PM-555", INS_FULL}
    # The Saint-Aubin clerk does not know this patient: same answer as a missing one.
    assert_problem(
        client_for(clerk).get("/api/v1/patients", {"issuer": "CH-PORTMAEL", "value": "PM-555"}), 404
    )
    assert_problem(
        client_for(clerk).get("/api/v1/patients", {"issuer": "CH-PORTMAEL", "value": "NOPE"}), 404
    )
    assert AuditEvent.objects.filter(code=EventCode.PATIENT_QUERY).count() == 3


def test_an_institution_admin_unlinks_an_identifier_of_their_institution(
    region, shared_patient, institution_admin, outsider
):
    body = {"issuer": "CH-PORTMAEL", "value": "PM-555", "reason": "wrong INS on the file"}
    assert_problem(client_for(outsider).post("/api/v1/identity/unlink", body, format="json"), 404)

    response = client_for(institution_admin).post("/api/v1/identity/unlink", body, format="json")

    assert response.status_code == 201, response.content
    assert [i["value"] for i in response.json()["identifiers"]] == ["PM-555"]


def publish_jean_leroy_at(places):
    """Jean LEROY known at two hospitals under local IDs, no INS: a candidate link."""
    for institution, pid, study in places:
        manifest_register(
            data=kos_for(
                institution,
                pid,
                study=study,
                family="LEROY",
                given="Jean",
                birth=dt.date(1950, 11, 2),
                sex="M",
            ),
            institution=institution,
            actor=SYSTEM,
            now=NOW,
        )


def test_candidates_are_reviewed_through_the_api(region, region_admin, outsider):
    publish_jean_leroy_at([(region.staubin, "SA-0042", 4), (region.chu, "100777", 5)])
    assert client_for(outsider).get("/api/v1/identity/candidates").json() == []
    candidates = client_for(region_admin).get("/api/v1/identity/candidates").json()
    assert len(candidates) == 1

    response = client_for(region_admin).post(
        f"/api/v1/identity/candidates/{candidates[0]['id']}", {"decision": "confirm"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["status"] == "confirmed"


# ---------------------------------------------------------------------------
# Institutions


def test_a_region_admin_onboards_an_institution_and_others_cannot(
    region, region_admin, institution_admin
):
    body = {
        "finess": "440000057",
        "name": "CH de Lannou",
        "patient_id_issuer": "CH-LANNOU",
        "ae_title": "LANNOU_PACS",
        "dicom_host": "127.0.0.1",
        "dicom_port": 4250,
    }
    assert_problem(
        client_for(institution_admin).post("/api/v1/institutions", body, format="json"), 403
    )

    response = client_for(region_admin).post("/api/v1/institutions", body, format="json")

    assert response.status_code == 201, response.content
    assert Institution.objects.filter(finess="440000057").exists()
    assert AuditEvent.objects.filter(
        code=EventCode.INSTITUTION_CREATE, participant_objects__0__finess="440000057"
    ).exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"finess": "12"}, "finess"),
        ({"ae_title": "TOO_LONG_AE_TITLE_X"}, "ae_title"),
        ({"ae_title": "X", "dicom_port": 4250}, None),
        ({"patient_id_issuer": "CHU-BELLECOMBE"}, None),
    ],
    ids=["bad-finess", "long-ae", "incomplete-endpoint", "duplicate-issuer"],
)
def test_bad_institutions_are_refused_with_a_problem(region, region_admin, change, field):
    body = {
        "finess": "440000057",
        "name": "CH de Lannou",
        "patient_id_issuer": "CH-LANNOU",
        **change,
    }
    response = client_for(region_admin).post("/api/v1/institutions", body, format="json")
    problem = assert_problem(response, 400)
    if field:
        assert field in problem["errors"]
    assert not Institution.objects.filter(name="CH de Lannou").exists()


def test_an_institution_admin_updates_their_own_institution_only(region, institution_admin):
    client = client_for(institution_admin)
    response = client.patch(
        f"/api/v1/institutions/{region.portmael.finess}",
        {"dicomweb_url": "http://127.0.0.1:8043/dicom-web/"},
        format="json",
    )
    assert response.status_code == 200, response.content
    assert response.json()["dicomweb_url"] == "http://127.0.0.1:8043/dicom-web/"
    assert_problem(
        client.patch(f"/api/v1/institutions/{region.chu.finess}", {"name": "X"}, format="json"), 403
    )
    assert_problem(
        client.patch(
            f"/api/v1/institutions/{region.portmael.finess}", {"active": False}, format="json"
        ),
        403,
    )


def test_the_openapi_schema_is_served(region, referring_doctor):
    response = client_for(referring_doctor).get("/api/schema/")
    assert response.status_code == 200
    assert b"/api/v1/manifests" in response.content


def test_an_unknown_api_path_is_a_problem(region, referring_doctor):
    response = client_for(referring_doctor).get("/api/v1/nothing-here")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/problem+json")


# ---------------------------------------------------------------------------
# Found in review: each of these was a hole


def test_an_empty_body_is_a_400_problem_and_audited(region):
    response = publish(system_client(region, region.chu), b"")

    assert_problem(response, 400, "relais:request:malformed")
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT).count() == 1


def test_an_institution_admin_sees_no_candidate_involving_another_hospitals_patient(
    region, institution_admin
):
    publish_jean_leroy_at([(region.staubin, "SA-0042", 4), (region.portmael, "PM-77", 5)])
    assert client_for(institution_admin).get("/api/v1/identity/candidates").json() == []


def test_an_institution_admin_cannot_unlink_another_hospitals_identifier_or_the_ins(
    region, shared_patient, institution_admin
):
    client = client_for(institution_admin)
    for issuer, value in [("CHU-BELLECOMBE", "100001"), ("1.2.250.1.213.1.4.10", INS_FULL)]:
        body = {"issuer": issuer, "value": value, "reason": "not mine"}
        assert_problem(client.post("/api/v1/identity/unlink", body, format="json"), 404)
    assert Patient.objects.get(identifiers__value="100001") == shared_patient


def test_a_cursor_with_an_absurd_id_is_a_400(region, referring_doctor):
    import base64
    import json

    cursor = base64.urlsafe_b64encode(json.dumps(["2020-01-01", 10**30]).encode()).decode()
    response = client_for(referring_doctor).get("/api/v1/manifests", {"cursor": cursor})
    assert_problem(response, 400, "relais:cursor:invalid")


def test_only_a_region_admin_changes_an_institutions_patient_id_domain(
    region, institution_admin, region_admin
):
    url = f"/api/v1/institutions/{region.portmael.finess}"
    body = {"patient_id_issuer": "CH-PM-NEW"}
    assert_problem(client_for(institution_admin).patch(url, body, format="json"), 403)
    manifest_register(
        data=kos_for(region.portmael, "PM-1", study=8),
        institution=region.portmael,
        actor=SYSTEM,
        now=NOW,
    )
    # Once patients are known under it, nobody changes it.
    assert_problem(
        client_for(region_admin).patch(url, body, format="json"),
        409,
        "registry:institution:domain-in-use",
    )


def test_the_ins_domain_cannot_be_an_institutions_local_domain(region, region_admin):
    body = {
        "finess": "440000057",
        "name": "CH de Lannou",
        "patient_id_issuer": "1.2.250.1.213.1.4.8",
    }
    response = client_for(region_admin).post("/api/v1/institutions", body, format="json")
    assert_problem(response, 400, "registry:institution:ins-domain")
