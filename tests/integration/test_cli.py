"""The management commands, as an operator uses them."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from audit.events import EventCode
from audit.models import AuditEvent
from broker.models import (
    Institution,
    InstitutionAPIKey,
    LinkCandidate,
    Manifest,
    Membership,
    Patient,
)
from tests.registry_helpers import kos_for


def run(*args, **kwargs) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err, **kwargs)
    return out.getvalue(), err.getvalue()


def test_add_institution_onboards_through_the_same_service(db):
    out, _ = run(
        "add_institution",
        "--finess",
        "440000057",
        "--name",
        "CH de Lannou",
        "--issuer",
        "CH-LANNOU",
        "--ae-title",
        "LANNOU_PACS",
        "--host",
        "127.0.0.1",
        "--port",
        "4250",
        "--dicomweb-url",
        "http://127.0.0.1:8050/dicom-web/",
    )

    institution = Institution.objects.get(finess="440000057")
    assert institution.has_dimse
    assert "CH de Lannou" in out
    event = AuditEvent.objects.get(code=EventCode.INSTITUTION_CREATE)
    assert event.actor_username.startswith("cli:")


def test_add_institution_refuses_bad_input_with_a_message(db):
    with pytest.raises(CommandError, match="FINESS"):
        run("add_institution", "--finess", "12", "--name", "X", "--issuer", "X")
    with pytest.raises(CommandError, match="AE title, a host and a port"):
        run(
            "add_institution",
            "--finess",
            "440000057",
            "--name",
            "X",
            "--issuer",
            "X",
            "--ae-title",
            "X",
        )
    assert not Institution.objects.exists()


def test_create_api_key_prints_the_key_once_and_stores_it_hashed(region):
    out, err = run("create_api_key", "--institution", region.chu.finess, "--name", "PACS")

    key = out.strip()
    stored = InstitutionAPIKey.objects.get(
        name="PACS", institution=region.chu, prefix=key.split(".")[0]
    )
    assert key not in stored.hashed_key
    assert InstitutionAPIKey.objects.is_valid(key)
    assert "shown only now" in err


def test_create_api_key_for_an_unknown_institution_fails(db):
    with pytest.raises(CommandError, match="No institution"):
        run("create_api_key", "--institution", "999999999")


def test_import_manifests_summarises_and_fails_when_any_is_rejected(region, tmp_path: Path):
    folder = tmp_path / "kos"
    folder.mkdir()
    (folder / "a.dcm").write_bytes(kos_for(region.chu, "100001", study=1))
    (folder / "b.dcm").write_bytes(kos_for(region.chu, "100002", study=2))
    (folder / "sub").mkdir()
    (folder / "sub" / "c.dcm").write_bytes(
        kos_for(region.chu, "100001", study=1, series=(("CT", "1.2.840.10008.5.1.4.1.1.2", 5),))
    )
    (folder / "junk.txt").write_bytes(b"not a manifest")

    with pytest.raises(CommandError) as failed:
        run("import_manifests", str(folder), "--institution", region.chu.finess, "--no-progress")

    assert failed.value.returncode == 1
    assert Manifest.objects.count() == 3
    assert Manifest.objects.filter(status="Approved").count() == 2


def test_import_manifests_twice_reports_unchanged(region, tmp_path: Path):
    path = tmp_path / "a.dcm"
    path.write_bytes(kos_for(region.chu, "100001", study=1))
    run("import_manifests", str(path), "--institution", region.chu.finess, "--no-progress")

    out, _ = run("import_manifests", str(path), "--institution", region.chu.finess, "--no-progress")

    assert "0 new, 1 unchanged, 0 replaced, 0 rejected" in out


def test_import_manifests_names_a_missing_path(region):
    with pytest.raises(CommandError, match="no such file"):
        run("import_manifests", "/nonexistent/x.dcm", "--institution", region.chu.finess)


def test_seed_demo_loads_a_region_once_and_prints_the_accounts(db):
    out, _ = run("seed_demo")
    assert Institution.objects.count() == 3
    assert {m.role for m in Membership.objects.all()} >= {
        "referring_doctor",
        "radiologist",
        "teleradiologist",
        "emergency_doctor",
        "admissions_clerk",
        "institution_admin",
        "dpo",
    }
    assert Manifest.objects.count() == 6
    # Marie Dupont is one patient at two hospitals (qualified INS); Jean Leroy a candidate.
    dupont = Patient.objects.get(identifiers__value="PM-555")
    assert set(dupont.identifiers.values_list("kind", flat=True)) == {"IPP", "INS-NIR"}
    assert dupont.identifiers.filter(kind="IPP").count() == 2
    assert LinkCandidate.objects.filter(status="pending").count() == 1
    assert "dr.martin" in out
    assert "relais-demo-2026" in out

    again, _ = run("seed_demo")
    assert "already loaded" in again
    assert Manifest.objects.count() == 6


def test_seed_demo_refuses_a_registry_of_a_real_region(db):
    run("add_institution", "--finess", "440000057", "--name", "CH de Lannou", "--issuer", "L")

    with pytest.raises(CommandError, match="only into an empty registry"):
        run("seed_demo")

    assert not Membership.objects.exists()
    assert Institution.objects.count() == 1
