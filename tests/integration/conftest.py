"""Fixtures shared by the gateway's tests: a CHU study harvested from the region's Orthanc, and
a token for it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from broker.archives import institution_archive
from broker.harvest import harvest_run
from broker.models import Institution, Manifest, ManifestStatus, Role
from broker.services import institution_update
from sharing import services
from sharing.models import AccessRequest
from tests.conftest import NOW, SYSTEM, Region, make_user
from tests.peers.fixtures import OrthancRegion
from tests.peers.orthanc import OrthancArchive
from tests.peers.studies import CHUB_AE, SyntheticStudy


def pointed_at(institution: Institution, archive: OrthancArchive) -> Institution:
    """The institution's archive entry, at this Orthanc (both transports)."""
    return institution_update(
        institution=institution,
        ae_title=archive.aet,
        dicom_host="127.0.0.1",
        dicom_port=archive.dicom_port,
        dicomweb_url=archive.dicomweb_url,
        actor=SYSTEM,
        now=NOW,
    )


def harvested(institution: Institution, archive: OrthancArchive) -> Institution:
    """`institution` with `archive` as its archive (DICOM and DICOMweb), its studies harvested."""
    institution = pointed_at(institution, archive)
    harvest_run(
        institution=institution,
        client_factory=lambda: institution_archive(institution, "dicomweb"),
        transport="dicomweb",
        actor=SYSTEM,
    )
    return institution


def radiologist_token(
    institution: Institution, manifest: Manifest, username: str
) -> tuple[str, AccessRequest, User]:
    """A radiologist of `institution` (its care team), a treatment ticket on the manifest's
    study, and a retrieval token under it."""
    doctor = make_user(username, [(institution, Role.RADIOLOGIST)])
    ticket = services.request_create(
        user=doctor,
        purpose="treatment",
        patient=manifest.source_identifier.patient,
        institution=institution,
        studies=[manifest.study_instance_uid],
        justification="relecture",
        actor=SYSTEM,
        now=timezone.now(),
    )
    token, _ = services.token_issue_for_ticket(
        user=doctor, ticket=ticket, actor=SYSTEM, now=timezone.now()
    )
    return token, ticket, doctor


@pytest.fixture
def chu(region: Region, orthanc_region: OrthancRegion) -> Institution:
    return harvested(region.chu, orthanc_region.archives[CHUB_AE])


@pytest.fixture
def shared(chu, orthanc_region: OrthancRegion):
    """A CHU study, and a token for it in the hands of a CHU radiologist (care team)."""
    study: SyntheticStudy = orthanc_region.studies[CHUB_AE][0]
    manifest = Manifest.objects.get(
        study_instance_uid=study.study_instance_uid, status=ManifestStatus.APPROVED
    )
    token, ticket, doctor = radiologist_token(chu, manifest, "dr.viewer")
    return {
        "study": study,
        "manifest": manifest,
        "token": token,
        "ticket": ticket,
        "doctor": doctor,
    }
