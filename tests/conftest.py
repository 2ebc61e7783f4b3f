"""Personas and the demo-like region every test can stand on.

A region of three institutions (a CHU and two hospitals), a user for every role, and
an API key per institution. Tests read as: "the referring doctor at Port-Maël ...".
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.db import connection
from rest_framework.test import APIClient

from audit.services import Actor
from broker.models import Institution, Membership, Professional, Role
from broker.services import api_key_create, institution_create

pytest_plugins = ["tests.peers.fixtures"]

NOW = dt.datetime(2026, 11, 28, 10, 0, tzinfo=dt.UTC)
SYSTEM = Actor.system("tests")


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


@dataclass
class Region:
    chu: Institution
    portmael: Institution
    staubin: Institution
    keys: dict[str, str]


@pytest.fixture
def now() -> dt.datetime:
    return NOW


@pytest.fixture
def region(db: Any) -> Region:
    chu = institution_create(
        finess="350000014",
        name="CHU de Bellecombe",
        patient_id_issuer="CHU-BELLECOMBE",
        patient_id_issuer_oid="1.2.250.1.999.350000014",
        ae_title="CHUB_PACS",
        dicom_host="127.0.0.1",
        dicom_port=4242,
        actor=SYSTEM,
        now=NOW,
    )
    portmael = institution_create(
        finess="560000019",
        name="CH de Port-Maël",
        patient_id_issuer="CH-PORTMAEL",
        ae_title="PORTMAEL_PACS",
        dicom_host="127.0.0.1",
        dicom_port=4243,
        actor=SYSTEM,
        now=NOW,
    )
    staubin = institution_create(
        finess="290000012",
        name="Hôpital de Saint-Aubin",
        patient_id_issuer="HOP-SAINTAUBIN",
        dicomweb_url="http://127.0.0.1:8044/dicom-web/",
        actor=SYSTEM,
        now=NOW,
    )
    keys = {
        inst.finess: api_key_create(institution=inst, name="PACS", actor=SYSTEM, now=NOW)[1]
        for inst in (chu, portmael, staubin)
    }
    return Region(chu=chu, portmael=portmael, staubin=staubin, keys=keys)


def make_user(
    username: str,
    memberships: list[tuple[Institution, str]] = (),  # type: ignore[assignment]
    *,
    region_admin: bool = False,
) -> Any:
    # No password: tests sign in with force_authenticate (hashing one costs ~1 s of PBKDF2).
    user = get_user_model().objects.create_user(username=username)
    professional = Professional.objects.create(user=user, is_region_admin=region_admin)
    for institution, role in memberships:
        Membership.objects.create(professional=professional, institution=institution, role=role)
    return user


@pytest.fixture
def referring_doctor(region: Region) -> Any:
    """Dr Martin, referring doctor at Port-Maël."""
    return make_user("dr.martin", [(region.portmael, Role.REFERRING_DOCTOR)])


@pytest.fixture
def radiologist(region: Region) -> Any:
    """Dr Bernard, radiologist at the CHU."""
    return make_user("dr.bernard", [(region.chu, Role.RADIOLOGIST)])


@pytest.fixture
def clerk(region: Region) -> Any:
    """An admissions clerk at Saint-Aubin."""
    return make_user("m.robert", [(region.staubin, Role.ADMISSIONS_CLERK)])


@pytest.fixture
def institution_admin(region: Region) -> Any:
    """The administrator of Port-Maël."""
    return make_user("admin.portmael", [(region.portmael, Role.INSTITUTION_ADMIN)])


@pytest.fixture
def dpo(region: Region) -> Any:
    return make_user("dpo.chu", [(region.chu, Role.DPO)])


@pytest.fixture
def region_admin(region: Region) -> Any:
    return make_user("admin.region", region_admin=True)


@pytest.fixture
def outsider(db: Any) -> Any:
    """Signed in, but a member of no institution of the region."""
    return make_user("outsider")


@pytest.fixture
def api() -> APIClient:
    return APIClient()


def client_for(user: Any) -> APIClient:
    client = APIClient()
    client.force_authenticate(user)
    return client


def system_client(region: Region, institution: Institution) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Api-Key {region.keys[institution.finess]}")
    return client


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    """Tests marked ``postgres`` run only when the suite runs on PostgreSQL."""
    from django.conf import settings

    if settings.DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
        return
    skip = pytest.mark.skip(reason="PostgreSQL only (set DATABASE_URL); CI runs it")
    for item in items:
        if "postgres" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _recent_lookups_forgotten() -> None:
    """A database rolled back or flushed may give its ids again: the gateway's kept lookups
    (`sharing.recent`) of the test before must not answer for them."""
    from sharing.recent import recent_clear

    recent_clear()


@pytest.fixture(autouse=True)
def _audit_trail_emptied_before_flush(request: Any) -> Any:
    """Transactional tests end with a flush, which the audit triggers refuse while audit
    rows exist: empty the trail first (triggers suspended), then let Django flush."""
    marker = request.node.get_closest_marker("django_db")
    transactional = {"transactional_db", "live_server"} & set(request.fixturenames) or (
        marker is not None and marker.kwargs.get("transaction")
    )
    if not transactional:
        yield
        return
    from audit.triggers import append_only_suspended

    request.getfixturevalue("transactional_db")
    yield
    with append_only_suspended(), connection.cursor() as cursor:
        cursor.execute("DELETE FROM audit_auditevent")
