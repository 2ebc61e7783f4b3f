"""The retrieval gateway against real Orthanc archives: a viewer-like client fetches a shared
study through ``/dicomweb/`` and gets every instance as the archive holds it; refusals."""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import logging
import os
import re
import socket
import struct
import time
from typing import Any

import httpx
import pydicom
import pytest
from django.core.signals import request_finished
from django.db import close_old_connections, connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.events import EventCode
from audit.models import AuditEvent
from broker.dicom.multipart import MultipartParts
from broker.errors import NotFound
from broker.models import Manifest, ManifestInstance, ManifestStatus
from sharing import revocation, services
from sharing.gateway import gateway_access, gateway_manifest, media_storage_sop_instance_uid
from tests.conftest import SYSTEM, Region, make_user
from tests.integration.conftest import harvested, radiologist_token
from tests.integration.gunicorn_harness import gunicorn_serving
from tests.peers.fixtures import BROKER_MODALITY
from tests.peers.studies import (
    CHUB_AE,
    CHUB_ISSUER,
    CHUB_ISSUER_OID,
    DUPONT_CHUB_IPP,
    MARIE_DUPONT,
    make_study,
)

pytestmark = pytest.mark.django_db


def parts(response: Any) -> list[bytes]:
    """The bodies of a multipart/related answer, in order."""
    boundary = re.search(r"boundary=([^;]+)", response["Content-Type"]).group(1).strip('"')
    body = b"".join(response.streaming_content)
    delimiter = b"--" + boundary.encode()
    assert body.endswith(delimiter + b"--\r\n"), "the stream ended short"
    found = []
    for chunk in body.split(delimiter)[1:-1]:
        headers, _, data = chunk.partition(b"\r\n\r\n")
        assert b"Content-Type: application/dicom" in headers
        found.append(data[:-2])  # the part's closing CRLF
    return found


def after_meta(data: bytes) -> bytes:
    """A Part 10 file's data set: what follows its meta group ((0002,0000) gives its length)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length :]


def sop_uid(data: bytes) -> str:
    return str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def status_of(response: Any) -> int:
    """An answer's status, its body (not read) closed, as a server closes it: the gateway then
    closes the archive's connection and records the transfer at once, not when the garbage
    collector gets to it. (As Django's test client closes a response it has read: without
    closing the test's database connection.)"""
    request_finished.disconnect(close_old_connections)
    try:
        response.close()
    finally:
        request_finished.connect(close_old_connections)
    return int(response.status_code)


def viewer(token: str | None) -> Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return Client(headers=headers)


def test_a_viewer_fetches_the_whole_study_byte_for_byte(shared):
    study = shared["study"]
    response = viewer(shared["token"]).get(
        f"/dicomweb/studies/{study.study_instance_uid}",
        HTTP_ACCEPT='multipart/related; type="application/dicom"',
    )
    assert response.status_code == 200
    assert response["Content-Type"].startswith('multipart/related; type="application/dicom"')
    received = parts(response)
    uploaded = {sop_uid(data): data for data in study.instances}
    assert len(received) == len(uploaded)
    assert {sop_uid(d): d for d in received} == uploaded  # byte for byte, as the archive holds
    begin = AuditEvent.objects.get(code=EventCode.TRANSFER_BEGIN)
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert (begin.event_id, end.event_id) == ("110102", "110104")
    assert end.outcome == 0
    assert end.details["instances"] == len(uploaded)
    assert end.details["bytes"] == sum(len(d) for d in uploaded.values())
    assert end.correlation_id == shared["ticket"].public_id
    assert end.patient_id == str(shared["manifest"].source_identifier.patient.public_id)


def test_a_series_and_an_instance(shared):
    study, manifest = shared["study"], shared["manifest"]
    series = manifest.series.order_by("id").first()
    client = viewer(shared["token"])
    base = f"/dicomweb/studies/{study.study_instance_uid}/series/{series.series_instance_uid}"
    in_series = parts(client.get(base))
    expected = set(
        ManifestInstance.objects.filter(series=series).values_list("sop_instance_uid", flat=True)
    )
    assert {sop_uid(d) for d in in_series} == expected
    one = sorted(expected)[0]
    (single,) = parts(client.get(f"{base}/instances/{one}"))
    assert sop_uid(single) == one
    assert media_storage_sop_instance_uid(single) == one


def test_the_manifest_is_found_without_loading_its_document(shared):
    """The KOS itself (~200 bytes an instance) is not read on the way to the first byte."""
    access = gateway_access(
        authorization=f"Bearer {shared['token']}", address="127.0.0.1", now=timezone.now()
    )
    manifest = gateway_manifest(access, shared["study"].study_instance_uid)
    assert manifest.pk == shared["manifest"].pk
    assert manifest.get_deferred_fields() == {"kos_bytes"}


def instance_url(manifest: Manifest) -> str:
    series = manifest.series.order_by("id").first()
    sop = series.instances.order_by("id").first().sop_instance_uid
    return (
        f"/dicomweb/studies/{manifest.study_instance_uid}/series/{series.series_instance_uid}"
        f"/instances/{sop}"
    )


def test_a_viewing_looks_up_its_token_manifest_and_instances_once(shared, settings):
    """The requests of a viewing after the first: the token's holder, the study's manifest,
    its instances and the patient are kept (sharing.recent); only the audit is written."""
    settings.RELAIS_REVOCATION_POLL_SECONDS = 1  # kept for longer than a busy machine's request
    manifest = shared["manifest"]
    series = manifest.series.order_by("id").first()
    first, second = series.instances.order_by("id").values_list("sop_instance_uid", flat=True)[:2]
    base = f"/dicomweb/studies/{manifest.study_instance_uid}/series/{series.series_instance_uid}"
    client = viewer(shared["token"])
    assert len(parts(client.get(f"{base}/instances/{first}"))) == 1
    with CaptureQueriesContext(connection) as queries:
        assert len(parts(client.get(f"{base}/instances/{second}"))) == 1
    read = " ".join(query["sql"] for query in queries)
    for table in ("sharing_issuedtoken", "broker_manifest", "broker_manifestinstance"):
        assert f'"{table}"' not in read
    assert "broker_patientidentifier" not in read
    assert AuditEvent.objects.filter(code=EventCode.TRANSFER_END).count() == 2  # each audited


def test_a_token_revoked_while_its_holder_is_kept_is_refused_at_once(shared, settings, monkeypatch):
    settings.RELAIS_REVOCATION_POLL_SECONDS = 1
    monkeypatch.setattr(revocation, "_revocations", revocation.RevocationList(poll_seconds=0))
    client = viewer(shared["token"])
    url = instance_url(shared["manifest"])
    assert status_of(client.get(url)) == 200  # the holder is now kept
    services.request_revoke(
        user=make_user("admin.region3", region_admin=True),
        ticket=shared["ticket"],
        reason="erreur de patient",
        actor=SYSTEM,
        now=timezone.now(),
    )
    refused = client.get(url)
    assert refused.status_code == 401
    assert refused.json()["code"] == "token:revoked"


def test_a_kept_manifest_answers_only_for_its_patient(shared):
    """The manifests are kept by (patient, study): the same study asked for under another
    patient's ticket is looked up for that patient, and not found."""
    access = gateway_access(
        authorization=f"Bearer {shared['token']}", address="127.0.0.1", now=timezone.now()
    )
    study = shared["study"].study_instance_uid
    assert gateway_manifest(access, study).pk == shared["manifest"].pk  # kept
    other = dataclasses.replace(
        access, ticket=dataclasses.replace(access.ticket, patient_id=access.ticket.patient_id + 1)
    )
    with pytest.raises(NotFound):
        gateway_manifest(other, study)


def test_a_manifest_deprecated_during_a_viewing_is_refused_once_the_delay_has_passed(shared):
    """Requests that keep coming do not keep the old manifest alive: it is read again once
    RELAIS_REVOCATION_POLL_SECONDS (0.5 s) has passed since it was read."""
    manifest = shared["manifest"]
    url = instance_url(manifest)
    client = viewer(shared["token"])
    assert len(parts(client.get(url))) == 1
    Manifest.objects.filter(pk=manifest.pk).update(
        status=ManifestStatus.DEPRECATED, deprecated_at=timezone.now()
    )
    deadline = time.monotonic() + 3
    while (status := status_of(client.get(url))) == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert status == 404


def test_the_same_through_c_get_when_the_archive_has_no_dicomweb(shared, chu):
    chu.archive_transport = "dimse"
    chu.save(update_fields=["archive_transport"])
    study = shared["study"]
    received = parts(viewer(shared["token"]).get(f"/dicomweb/studies/{study.study_instance_uid}"))
    uploaded = {sop_uid(data): data for data in study.instances}
    assert len(received) == len(uploaded)
    for data in received:
        copy = pydicom.dcmread(io.BytesIO(data))
        original = pydicom.dcmread(io.BytesIO(uploaded[copy.SOPInstanceUID]))
        assert copy.PixelData == original.PixelData
        assert copy == original
        # The file meta is the broker's (C-GET carries the data set alone); the data set is
        # the archive's, byte for byte.
        assert after_meta(data) == after_meta(uploaded[copy.SOPInstanceUID])


def test_qido_answers_from_the_registry_within_the_token(shared, orthanc_region):
    study, manifest = shared["study"], shared["manifest"]
    client = viewer(shared["token"])
    studies = client.get("/dicomweb/studies")
    assert studies["Content-Type"] == "application/dicom+json"
    (found,) = studies.json()
    assert found["0020000D"]["Value"] == [study.study_instance_uid]
    assert found["00201208"]["Value"] == [manifest.instance_count]
    with CaptureQueriesContext(connection) as queries:
        series = client.get(f"/dicomweb/studies/{study.study_instance_uid}/series").json()
    assert len(series) == manifest.series_count
    assert {s["0020000E"]["Value"][0]: s["00201209"]["Value"][0] for s in series} == {
        s.series_instance_uid: s.instances.count() for s in manifest.series.all()
    }
    # the counts are the registry's own, not one query a series
    assert not [q for q in queries.captured_queries if "broker_manifestinstance" in q["sql"]]
    first = series[0]["0020000E"]["Value"][0]
    instances = client.get(
        f"/dicomweb/studies/{study.study_instance_uid}/series/{first}/instances"
    ).json()
    assert {i["00080018"]["Value"][0] for i in instances} == set(
        ManifestInstance.objects.filter(series__series_instance_uid=first).values_list(
            "sop_instance_uid", flat=True
        )
    )
    assert AuditEvent.objects.filter(code=EventCode.GATEWAY_QUERY).count() == 3


def test_qido_for_a_signed_in_user_answers_within_the_tokens_they_hold(shared, orthanc_region, dpo):
    study, manifest, doctor = shared["study"], shared["manifest"], shared["doctor"]
    session = Client()
    session.force_login(doctor)
    (found,) = session.get("/dicomweb/studies").json()
    assert found["0020000D"]["Value"] == [study.study_instance_uid]
    series = session.get(f"/dicomweb/studies/{study.study_instance_uid}/series").json()
    assert len(series) == manifest.series_count
    first = series[0]["0020000E"]["Value"][0]
    instances = session.get(
        f"/dicomweb/studies/{study.study_instance_uid}/series/{first}/instances"
    ).json()
    assert len(instances) == manifest.series.get(series_instance_uid=first).instances.count()
    queries = AuditEvent.objects.filter(code=EventCode.GATEWAY_QUERY).order_by("sequence")
    assert [(q.actor_username, q.patient_id != "") for q in queries] == [
        (doctor.username, True)
    ] * 3
    # Another study of the same archive, held by another doctor's token: the same 404 as a
    # missing one, refused for nobody's patient; and not listed.
    other = orthanc_region.studies[CHUB_AE][1].study_instance_uid
    radiologist_token(
        shared["manifest"].source_institution,
        Manifest.objects.get(study_instance_uid=other, status=ManifestStatus.APPROVED),
        "dr.other",
    )
    assert [s["0020000D"]["Value"][0] for s in session.get("/dicomweb/studies").json()] == [
        study.study_instance_uid
    ]
    assert session.get(f"/dicomweb/studies/{other}/series").status_code == 404
    refused = AuditEvent.objects.get(code=EventCode.GATEWAY_REFUSE)
    assert (refused.actor_username, refused.patient_id) == (doctor.username, "")
    # A series of their study the manifest does not list: refused for the study's patient.
    assert (
        session.get(
            f"/dicomweb/studies/{study.study_instance_uid}/series/1.2.3/instances"
        ).status_code
        == 404
    )
    refused = AuditEvent.objects.filter(code=EventCode.GATEWAY_REFUSE).order_by("sequence").last()
    assert refused.patient_id != ""
    # The images themselves need the token.
    assert session.get(f"/dicomweb/studies/{study.study_instance_uid}").status_code == 401
    # A query naming a study none of their tokens reaches: audited for nobody's patient.
    assert session.get(f"/dicomweb/studies?StudyInstanceUID={other}").json() == []
    last = AuditEvent.objects.filter(code=EventCode.GATEWAY_QUERY).order_by("sequence").last()
    assert (last.actor_username, last.patient_id, last.details["results"]) == (
        doctor.username,
        "",
        0,
    )
    # Another site's link or form, even a sibling's: the session does not answer.
    for site in ("cross-site", "same-site"):
        assert session.get("/dicomweb/studies", HTTP_SEC_FETCH_SITE=site).status_code == 401
    # Someone holding no token (a DPO) is shown nothing, audited under their name.
    outsider = Client()
    outsider.force_login(dpo)
    assert outsider.get("/dicomweb/studies").json() == []
    assert outsider.get(f"/dicomweb/studies/{study.study_instance_uid}/series").status_code == 404
    theirs = AuditEvent.objects.filter(actor_username=dpo.username).order_by("sequence")
    assert [(e.code, e.patient_id) for e in theirs] == [
        (EventCode.GATEWAY_QUERY, ""),
        (EventCode.GATEWAY_REFUSE, ""),
    ]
    # Once the ticket is revoked, its tokens show nothing either.
    services.request_revoke(
        user=make_user("admin.region3", region_admin=True),
        ticket=shared["ticket"],
        reason="erreur de patient",
        actor=SYSTEM,
        now=timezone.now(),
    )
    assert session.get("/dicomweb/studies").json() == []
    gone = session.get(f"/dicomweb/studies/{study.study_instance_uid}/series")
    assert gone.status_code == 404


def test_refusals(shared, orthanc_region, dpo):
    study = shared["study"]
    url = f"/dicomweb/studies/{study.study_instance_uid}"
    # No token, a token that is not one, a DPO signed in without one.
    assert viewer(None).get(url).status_code == 401
    assert viewer("not-a-token").get(url).status_code == 401
    session = Client()
    session.force_login(dpo)
    refused = session.get(url)
    assert refused.status_code == 401
    assert refused["WWW-Authenticate"].startswith("Bearer")
    # Another study of the same archive; a series or an instance the manifest does not list.
    other = orthanc_region.studies[CHUB_AE][1].study_instance_uid
    client = viewer(shared["token"])
    assert client.get(f"/dicomweb/studies/{other}").status_code == 404
    assert client.get(f"{url}/series/1.2.3.4").status_code == 404
    series = shared["manifest"].series.order_by("id").first().series_instance_uid
    assert client.get(f"{url}/series/{series}/instances/1.2.3.4").status_code == 404
    assert client.get(f"/dicomweb/studies/{other}/series").status_code == 404
    refusals = AuditEvent.objects.filter(code=EventCode.GATEWAY_REFUSE)
    assert refusals.count() == 7
    assert {e.event_id for e in refusals} == {"110113"}


def test_an_expired_token_and_a_token_revoked_mid_transfer(shared):
    study, doctor, ticket = shared["study"], shared["doctor"], shared["ticket"]
    url = f"/dicomweb/studies/{study.study_instance_uid}"
    old, _ = services.token_issue_for_ticket(
        user=doctor, ticket=ticket, actor=SYSTEM, now=timezone.now() - dt.timedelta(minutes=20)
    )
    expired = viewer(old).get(url)
    assert expired.status_code == 401
    assert expired.json()["code"] == "token:expired"
    client = viewer(shared["token"])
    series = shared["manifest"].series.order_by("id")
    first = client.get(f"{url}/series/{series[0].series_instance_uid}")
    assert first.status_code == 200
    services.request_revoke(
        user=make_user("admin.region2", region_admin=True),
        ticket=ticket,
        reason="erreur de patient",
        actor=SYSTEM,
        now=timezone.now(),
    )
    parts(first)  # the transfer under way completes
    time.sleep(0.6)  # every process's copy of the revocations is at most 0.5 s old
    refused = client.get(f"{url}/series/{series[1].series_instance_uid}")
    assert refused.status_code == 401
    assert refused.json()["code"] == "token:revoked"


def test_an_archive_that_is_down_is_a_503_with_a_retry_hint(shared, chu):
    chu.dicomweb_url = "http://127.0.0.1:9/dicom-web/"  # nothing listens there
    chu.save(update_fields=["dicomweb_url"])
    answer = viewer(shared["token"]).get(f"/dicomweb/studies/{shared['study'].study_instance_uid}")
    assert answer.status_code == 503
    assert answer["Retry-After"] == "60"
    assert answer["Content-Type"] == "application/problem+json"
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.outcome == 8
    assert "ArchiveUnreachable" in end.details["error"]


def stall(seconds: float):  # type: ignore[no-untyped-def]
    """An archive that takes the request and answers nothing for ``seconds``."""

    def reply(handler) -> None:  # type: ignore[no-untyped-def]
        time.sleep(seconds)
        handler.close_connection = True

    return reply


@pytest.mark.parametrize(
    ("archive", "status", "code", "retry_after"),
    [
        ("an HTTP 500", 502, "gateway:archive:error", "60"),
        ("no answer in time", 504, "gateway:archive:timeout", "30"),
    ],
)
def test_an_archive_that_fails_is_a_problem_with_a_retry_hint_and_the_rest_is_served(
    shared, chu, settings, monkeypatch, archive, status, code, retry_after
):
    from broker.dicom import archive as archive_module
    from tests.integration.test_archive import scripted_http
    from tests.integration.test_archive import status as http_status

    settings.RELAIS_DICOM_TIMEOUT = 1
    monkeypatch.setattr(archive_module, "_BACKOFF_BASE_SECONDS", 0.01)
    reply = http_status(500, b"boom") if status == 502 else stall(2.5)
    client = viewer(shared["token"])
    study = shared["study"].study_instance_uid
    with scripted_http(reply) as (url, _asked):
        chu.dicomweb_url = url
        chu.save(update_fields=["dicomweb_url"])
        answer = client.get(f"/dicomweb/studies/{study}")
        # The registry's side is served meanwhile.
        assert client.get(f"/dicomweb/studies/{study}/series").status_code == 200
    assert answer.status_code == status
    assert answer["Retry-After"] == retry_after
    assert answer["Content-Type"] == "application/problem+json"
    assert answer.json()["code"] == code
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.outcome == 8


def test_cors_for_a_viewer_on_another_origin(shared, settings):
    settings.CORS_ALLOWED_ORIGINS = ["https://viewer.example.org"]
    client = Client()
    preflight = client.options(
        "/dicomweb/studies",
        HTTP_ORIGIN="https://viewer.example.org",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
        HTTP_ACCESS_CONTROL_REQUEST_HEADERS="authorization",
    )
    assert preflight["Access-Control-Allow-Origin"] == "https://viewer.example.org"
    assert "authorization" in preflight["Access-Control-Allow-Headers"].lower()
    elsewhere = client.options(
        "/dicomweb/studies",
        HTTP_ORIGIN="https://evil.example.com",
        HTTP_ACCESS_CONTROL_REQUEST_METHOD="GET",
    )
    assert "Access-Control-Allow-Origin" not in elsewhere
    api = client.options("/api/v1/requests", HTTP_ORIGIN="https://viewer.example.org")
    assert "Access-Control-Allow-Origin" not in api  # only the gateway


def connections_to(port: int) -> set[str]:
    """This process's established TCP connections to 127.0.0.1:``port``, by socket inode
    (/proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    with open("/proc/self/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            remote_port = int(fields[2].split(":")[1], 16)
            if remote_port == port and fields[3] == "01" and fields[9] in inodes:
                found.add(fields[9])
    return found


def started_retrieval(shared, chu):  # type: ignore[no-untyped-def]
    """A whole-study retrieval of the shared study, as the gateway returns it (its first
    instance fetched), with the archive port and this process's connections to it before."""
    from sharing.gateway import gateway_access, gateway_instances, gateway_retrieve

    archive_port = int(httpx.URL(chu.dicomweb_url).port or 80)
    before = connections_to(archive_port)
    now = timezone.now()
    access = gateway_access(authorization=f"Bearer {shared['token']}", address="", now=now)
    manifest = shared["manifest"]
    _, body = gateway_retrieve(
        access,
        manifest,
        series_uid=None,
        sop_uid=None,
        allowed=gateway_instances(manifest),
        now=now,
    )
    return body, archive_port, before


def test_a_client_that_goes_away_mid_stream_leaves_nothing_open(shared, chu):
    body, archive_port, before = started_retrieval(shared, chu)
    next(body), next(body)  # the first part's header and instance
    retrieval = connections_to(archive_port) - before  # the retrieval's, from the archive
    assert retrieval
    body.close()  # what the server does when the client disconnects
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert end.outcome == 4
    assert end.details["instances"] == 0
    assert not retrieval & connections_to(archive_port)


def test_a_body_closed_before_its_first_piece_still_closes_and_audits(shared, chu):
    """A server drops a response whose client has gone before the body was asked for: the
    archive's connection is closed and Instances Transferred recorded all the same."""
    body, archive_port, before = started_retrieval(shared, chu)
    retrieval = connections_to(archive_port) - before
    assert retrieval  # the first instance is fetched before the answer begins
    body.close()  # never iterated
    end = AuditEvent.objects.get(code=EventCode.TRANSFER_END)
    assert (end.outcome, end.details["instances"]) == (4, 0)
    assert not retrieval & connections_to(archive_port)


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_metadata_of_what_the_manifest_lists_without_archive_urls(shared, chu, transport):
    chu.archive_transport = transport
    chu.save(update_fields=["archive_transport"])
    study = shared["study"]
    answer = viewer(shared["token"]).get(f"/dicomweb/studies/{study.study_instance_uid}/metadata")
    assert answer.status_code == 200
    assert answer["Content-Type"] == "application/dicom+json"
    items = answer.json()
    assert {i["00080018"]["Value"][0] for i in items} == {sop_uid(d) for d in study.instances}
    text = answer.content.decode()
    assert "BulkDataURI" not in text
    assert "127.0.0.1:" not in text
    pixel = items[0].get("7FE00010", {"vr": "OW"})
    assert "Value" not in pixel
    assert "InlineBinary" not in pixel
    assert AuditEvent.objects.filter(code=EventCode.GATEWAY_METADATA).count() == 1


@pytest.mark.parametrize("transport", ["dicomweb", "dimse"])
def test_an_instance_metadata_asks_the_archive_for_that_instance_alone(
    shared, chu, transport, monkeypatch
):
    """Over DIMSE that is a C-GET of the instance, not of its series (pixels included)."""
    from broker.dicom import archive

    chu.archive_transport = transport
    chu.save(update_fields=["archive_transport"])
    asked: list[tuple[Any, ...]] = []
    kind = archive.DimseArchive if transport == "dimse" else archive.DicomWebArchive
    real = kind.metadata

    def spied(self, *uids):  # type: ignore[no-untyped-def]
        asked.append(uids)
        return real(self, *uids)

    monkeypatch.setattr(kind, "metadata", spied)
    manifest = shared["manifest"]
    series = manifest.series.order_by("id").first()
    sop = series.instances.order_by("id").first().sop_instance_uid
    answer = viewer(shared["token"]).get(
        f"/dicomweb/studies/{manifest.study_instance_uid}/series/{series.series_instance_uid}"
        f"/instances/{sop}/metadata"
    )
    assert answer.status_code == 200
    assert [i["00080018"]["Value"][0] for i in answer.json()] == [sop]
    assert asked == [(manifest.study_instance_uid, series.series_instance_uid, sop)]


def test_frames_and_rendered_are_relayed_from_a_dicomweb_archive(shared, chu):
    manifest = shared["manifest"]
    series = manifest.series.order_by("id").first()
    instance = series.instances.order_by("id").first().sop_instance_uid
    base = (
        f"/dicomweb/studies/{manifest.study_instance_uid}/series/{series.series_instance_uid}"
        f"/instances/{instance}"
    )
    client = viewer(shared["token"])
    frame = client.get(
        f"{base}/frames/1", HTTP_ACCEPT='multipart/related; type="application/octet-stream"'
    )
    assert frame.status_code == 200
    assert frame["Content-Type"].startswith("multipart/related")
    frame_bytes = b"".join(frame.streaming_content)
    assert len(frame_bytes) > 1000
    rendered = client.get(f"{base}/rendered", HTTP_ACCEPT="image/jpeg")
    assert rendered.status_code == 200
    rendered_bytes = b"".join(rendered.streaming_content)
    assert rendered_bytes[:2] == b"\xff\xd8"  # a JPEG
    # Each audited as a transfer: begun, then ended once sent, with what was sent.
    begun = AuditEvent.objects.filter(code=EventCode.TRANSFER_BEGIN).order_by("sequence")
    ended = AuditEvent.objects.filter(code=EventCode.TRANSFER_END).order_by("sequence")
    assert [e.details["resource"] for e in begun] == [
        f"{instance}/frames/1",
        f"{instance}/rendered",
    ]
    assert [(e.details["resource"], e.details["bytes"], e.outcome) for e in ended] == [
        (f"{instance}/frames/1", len(frame_bytes), 0),
        (f"{instance}/rendered", len(rendered_bytes), 0),
    ]
    # A thumbnail where the archive offers one; Debian's Orthanc DICOMweb plugin (1.7) does
    # not: its refusal is the viewer's problem answer, and the transfer is audited as failed.
    thumbnail = client.get(f"{base}/thumbnail", HTTP_ACCEPT="image/jpeg")
    if thumbnail.status_code == 200:
        assert b"".join(thumbnail.streaming_content)[:2] == b"\xff\xd8"
    else:
        assert thumbnail["Content-Type"] == "application/problem+json"
        assert thumbnail.json()["code"].startswith("gateway:archive:")
        last = AuditEvent.objects.filter(code=EventCode.TRANSFER_END).order_by("sequence").last()
        assert (last.details["resource"], last.outcome) == (f"{instance}/thumbnail", 8)
    outside = f"/dicomweb/studies/{manifest.study_instance_uid}/series/1.2.3/instances/1.2.3.4"
    assert client.get(f"{outside}/frames/1").status_code == 404
    chu.archive_transport = "dimse"
    chu.save(update_fields=["archive_transport"])
    time.sleep(0.6)  # the gateway's lookups are at most 0.5 s old (sharing.recent)
    assert client.get(f"{base}/frames/1").status_code == 501


# ---------------------------------------------------------------- under gunicorn: zero copy
# Served by gunicorn's own request parser and response writer (tests/integration/
# gunicorn_harness.py), the gateway writes each instance on the client's socket itself, its
# bytes moved from the archive's socket inside the kernel (sharing/zero_copy.py).

ACCEPT_DICOM = {"Accept": 'multipart/related; type="application/dicom"'}


@pytest.fixture
def big_study(region: Region, orthanc_factory):
    """A CHU archive of its own holding a study of 0.5 MiB instances, harvested, and a CHU
    radiologist's token for it."""
    archive = orthanc_factory(
        "CHUB_BIG", modalities={BROKER_MODALITY: (BROKER_MODALITY, "127.0.0.1", 11112)}
    )  # the broker known to it: its C-GET is answered too
    instances = make_study(
        patient=MARIE_DUPONT,
        patient_id=DUPONT_CHUB_IPP,
        issuer=CHUB_ISSUER,
        issuer_oid=CHUB_ISSUER_OID,
        modality="CT",
        study_date=dt.date(2025, 3, 4),
        study_time=dt.time(8, 30),
        accession_number="BIG1",
        description="TDM TAP",
        series_count=2,
        instances_per_series=4,
        rows=512,
        columns=512,
        seed="gateway-zero-copy",
    )
    archive.upload_many(instances)
    chu = harvested(region.chu, archive)
    manifest = Manifest.objects.get(status=ManifestStatus.APPROVED)
    token, _ticket, _doctor = radiologist_token(chu, manifest, "dr.big")
    return {
        "chu": chu,
        "manifest": manifest,
        "token": token,
        "instances": instances,
        "archive": archive,
    }


@pytest.fixture
def served(monkeypatch):
    """The broker under gunicorn's writer; `writers` holds each chunk writer the gateway got."""
    from broker.wsgi import application
    from sharing import dicomweb, zero_copy

    writers: list[zero_copy.ChunkedSocketWriter] = []

    def spied(environ):
        writer = zero_copy.chunk_writer(environ)
        if writer is not None:
            writers.append(writer)
        return writer

    monkeypatch.setattr(dicomweb, "chunk_writer", spied)
    monkeypatch.setattr(zero_copy, "_server_frames_chunks", True)  # the harness is gunicorn's
    with gunicorn_serving(application) as harness:
        harness.writers = writers
        yield harness
    assert not harness.errors


def multipart_parts(response: httpx.Response) -> list[bytes]:
    boundary = re.search(r"boundary=([^;]+)", response.headers["Content-Type"]).group(1)
    stream = io.BufferedReader(io.BytesIO(response.content))  # type: ignore[arg-type]
    return list(MultipartParts(stream, boundary.strip('"').encode()))


def transfer_end() -> AuditEvent:
    deadline = time.monotonic() + 10
    while not (end := AuditEvent.objects.filter(code=EventCode.TRANSFER_END).first()):
        assert time.monotonic() < deadline, "no Instances Transferred record"
        time.sleep(0.05)
    return end


@pytest.mark.django_db(transaction=True)
def test_under_gunicorn_each_instance_goes_from_socket_to_socket(big_study, served):
    manifest, uploaded = big_study["manifest"], big_study["instances"]
    study_url = f"{served.url}/dicomweb/studies/{manifest.study_instance_uid}"
    headers = {"Authorization": f"Bearer {big_study['token']}", **ACCEPT_DICOM}
    with httpx.Client(headers=headers, timeout=30) as client:
        answer = client.get(study_url)
        assert answer.status_code == 200
        assert answer.headers["Transfer-Encoding"] == "chunked"
        received = multipart_parts(answer)
        assert {sop_uid(d): d for d in received} == {sop_uid(d): d for d in uploaded}
        total = sum(len(d) for d in uploaded)
        (writer,) = served.writers
        assert writer.spliced > 0.9 * total  # all but each instance's head and read-ahead
        end = transfer_end()
        assert (end.outcome, end.details["instances"], end.details["bytes"]) == (0, 8, total)

        # the same connection goes on: the framing the gateway wrote was exact
        series = manifest.series.order_by("id").first()
        again = client.get(f"{study_url}/series/{series.series_instance_uid}")
        assert len(multipart_parts(again)) == 4
        listing = client.get(f"{study_url}/series", headers={"Accept": "application/dicom+json"})
        assert listing.status_code == 200
        assert len(listing.json()) == 2
        assert answer.extensions["network_stream"] is again.extensions["network_stream"]


@pytest.mark.django_db(transaction=True)
def test_under_gunicorn_an_instance_the_manifest_does_not_list_is_left_out(big_study, served):
    manifest, uploaded = big_study["manifest"], big_study["instances"]
    dropped = ManifestInstance.objects.filter(series__manifest=manifest).order_by("id")[2]
    dropped.delete()
    answer = httpx.get(
        f"{served.url}/dicomweb/studies/{manifest.study_instance_uid}",
        headers={"Authorization": f"Bearer {big_study['token']}", **ACCEPT_DICOM},
        timeout=30,
    )
    received = {sop_uid(d) for d in multipart_parts(answer)}
    assert received == {sop_uid(d) for d in uploaded} - {dropped.sop_instance_uid}
    end = transfer_end()
    assert (end.details["instances"], end.details["left_out"]) == (7, 1)


@pytest.mark.django_db(transaction=True)
def test_under_gunicorn_a_client_that_goes_away_mid_instance(big_study, served, caplog):
    manifest = big_study["manifest"]
    with (
        caplog.at_level(logging.INFO, logger="sharing.gateway"),
        socket.create_connection(("127.0.0.1", served.port)) as sock,
    ):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        sock.sendall(
            f"GET /dicomweb/studies/{manifest.study_instance_uid} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {big_study['token']}\r\n\r\n".encode()
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    end = transfer_end()  # a reset on close: the gateway's next write fails
    assert end.outcome == 4
    assert end.details["instances"] < 8
    (writer,) = served.writers
    assert writer._pipe is None  # closed
    assert "sending to the client" in caplog.text  # found by the socket writer


def archive_answering(big_study, body: bytes):
    """The CHU's archive replaced by one that answers `body` (close-delimited, as Orthanc)."""
    from tests.integration.test_archive import cut, scripted_http

    content_type = 'multipart/related; type="application/dicom"; boundary=xyz'
    server = scripted_http(cut({"Content-Type": content_type}, body))
    url, _asked = server.__enter__()
    chu = big_study["chu"]
    chu.dicomweb_url = url
    chu.save(update_fields=["dicomweb_url"])
    return server


def fetch_broken(served, big_study) -> bytes:
    """The study through the gateway, which must come as a broken transfer; what came."""
    received = b""
    manifest = big_study["manifest"]
    with socket.create_connection(("127.0.0.1", served.port)) as sock:
        sock.settimeout(30)
        sock.sendall(
            f"GET /dicomweb/studies/{manifest.study_instance_uid} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {big_study['token']}\r\n\r\n".encode()
        )
        while chunk := sock.recv(1 << 20):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 OK")
    assert not received.endswith(b"\r\n0\r\n\r\n")  # never a well-framed end
    return received


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("fault", "error", "whole"),
    [
        ("cut mid-instance", "ended inside an instance", 1),
        ("a Content-Length too long", "does not go on with its boundary", 0),
        ("a Content-Length too short", "does not go on with its boundary", 0),
        ("a malformed second part", "not application/dicom", 1),
    ],
)
def test_under_gunicorn_an_archive_that_fails_mid_stream_breaks_the_transfer(
    big_study, served, fault, error, whole
):
    from tests.integration.test_archive import multipart

    first, second = big_study["instances"][:2]
    body = multipart(b"xyz", [first, second], lengths=True)
    if fault == "cut mid-instance":
        body = body[: -len(second) // 2]
    elif fault.startswith("a Content-Length"):
        declared = len(first) + (100 if fault.endswith("too long") else -100)
        body = body.replace(b"Content-Length: %d" % len(first), b"Content-Length: %d" % declared)
    else:
        body = body.replace(b"Content-Type: application/dicom", b"Content-Type: text/plain")
        body = body.replace(b"Content-Type: text/plain", b"Content-Type: application/dicom", 1)
    server = archive_answering(big_study, body)
    try:
        received = fetch_broken(served, big_study)
    finally:
        server.__exit__(None, None, None)
    end = transfer_end()
    assert end.outcome == 8
    assert error in end.details["error"]
    assert end.details["instances"] == whole
    if not whole:  # the first instance's chunk was begun, never ended
        size_line, _, data = received.partition(b"\r\n\r\n")[2].partition(b"\r\n")
        assert not data[int(size_line, 16) :].startswith(b"\r\n")


@pytest.mark.django_db(transaction=True)
def test_without_splicing_an_archive_that_fails_mid_stream_breaks_the_transfer(
    big_study, served, settings
):
    """The gateway's other path (a server that gives it no socket writer, a C-GET source): the
    failure is raised on to the server, which breaks the connection, never a well-framed end."""
    from broker.dicom.archive import ArchiveError
    from tests.integration.test_archive import multipart

    settings.RELAIS_GATEWAY_SPLICE = False
    first, second = big_study["instances"][:2]
    body = multipart(b"xyz", [first, second], lengths=True)[: -len(second) // 2]
    server = archive_answering(big_study, body)
    try:
        fetch_broken(served, big_study)
    finally:
        server.__exit__(None, None, None)
    assert not served.writers
    end = transfer_end()
    assert end.outcome == 8
    assert end.details["instances"] == 1
    assert "ArchiveProtocolError" in end.details["error"]
    assert served.errors
    assert all(isinstance(e, ArchiveError) for e in served.errors)
    served.errors.clear()  # what gunicorn logs as "Error handling request"


def other_instance(data: bytes) -> bytes:
    """An instance of the same study that no manifest lists."""
    dataset = pydicom.dcmread(io.BytesIO(data))
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99.1"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("splice", [True, False])
def test_an_archive_holding_none_of_the_listed_instances_is_a_404(
    big_study, served, settings, splice
):
    from tests.integration.test_archive import multipart

    settings.RELAIS_GATEWAY_SPLICE = splice
    unlisted = other_instance(big_study["instances"][0])
    server = archive_answering(big_study, multipart(b"xyz", [unlisted], lengths=True))
    manifest = big_study["manifest"]
    try:
        answer = httpx.get(
            f"{served.url}/dicomweb/studies/{manifest.study_instance_uid}",
            headers={"Authorization": f"Bearer {big_study['token']}", **ACCEPT_DICOM},
            timeout=30,
        )
    finally:
        server.__exit__(None, None, None)
    assert answer.status_code == 404
    assert answer.headers["Content-Type"] == "application/problem+json"
    assert answer.json()["code"] == "gateway:archive:not-found"
    end = transfer_end()
    assert end.outcome == 8
    assert (end.details["instances"], end.details["left_out"]) == (0, 1)


def test_a_series_the_archive_holds_but_the_manifest_does_not_list_is_a_missing_one(big_study):
    """A series added to the study at the archive after its manifest: the same 404, body for
    body, as a series that exists nowhere."""
    manifest = big_study["manifest"]
    dataset = pydicom.dcmread(io.BytesIO(big_study["instances"][0]))
    dataset.SeriesInstanceUID = "1.2.826.0.1.99.2"
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.99.2.1"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    big_study["archive"].upload(buffer.getvalue())
    client = viewer(big_study["token"])
    study_url = f"/dicomweb/studies/{manifest.study_instance_uid}"
    unlisted = client.get(f"{study_url}/series/1.2.826.0.1.99.2")
    nowhere = client.get(f"{study_url}/series/1.2.826.0.1.99.3")
    assert unlisted.status_code == nowhere.status_code == 404
    assert unlisted.json() == nowhere.json()
    for what in ("metadata", "instances/1.2.826.0.1.99.2.1"):
        assert client.get(f"{study_url}/series/1.2.826.0.1.99.2/{what}").json() == nowhere.json()
    listing = client.get(f"{study_url}/series").json()
    assert "1.2.826.0.1.99.2" not in {s["0020000E"]["Value"][0] for s in listing}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("source", ["dicomweb, no splicing", "dimse"])
def test_a_client_that_stops_reading_is_given_up(big_study, served, settings, monkeypatch, source):
    """gthread has no request timeout: the client's socket gets a send timeout, so a client
    that stays connected without reading does not hold a thread for ever. (A C-GET source is
    sent the same way as an archive's answer without splicing.)"""
    from sharing import zero_copy

    if source == "dimse":
        big_study["chu"].archive_transport = "dimse"
        big_study["chu"].save(update_fields=["archive_transport"])
    else:
        settings.RELAIS_GATEWAY_SPLICE = False
    monkeypatch.setattr(zero_copy, "CLIENT_SEND_TIMEOUT_SECONDS", 1.0)
    manifest = big_study["manifest"]
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        sock.sendall(
            f"GET /dicomweb/studies/{manifest.study_instance_uid} HTTP/1.1\r\n"
            f"Host: 127.0.0.1\r\nAuthorization: Bearer {big_study['token']}\r\n\r\n".encode()
        )
        assert sock.recv(1024).startswith(b"HTTP/1.1 200 OK")
        end = transfer_end()  # while the client is still connected, reading nothing
        assert end.outcome == 4
        assert end.details["instances"] < 8
