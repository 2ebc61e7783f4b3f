"""The manifests in fixtures/kos/ are what `build_kos` makes, byte for byte, and what
`parse_kos` reads back.

A manifest's SOP Instance UID is derived from its study's description: a change to how the
KOS is encoded, or to what the UID is derived from, would give every study harvested again a
new manifest (a replacement for each, in the registry and in the audit trail). Such a change
must be deliberate: regenerate the files (``RELAIS_WRITE_FIXTURES=1 .venv/bin/pytest
tests/unit/test_kos_fixtures.py``), and say why in the commit.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest

from broker.dicom.kos import (
    OtherPatientId,
    PatientInfo,
    ReferencedInstance,
    SeriesDescription,
    StudyDescription,
    build_kos,
    derive_kos_uids,
    parse_kos,
)

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "kos"
DESCRIPTIONS = sorted(FIXTURES.glob("*.json"))


def _date(value: str | None) -> dt.date | None:
    return dt.date.fromisoformat(value) if value else None


def _time(value: str | None) -> dt.time | None:
    return dt.time.fromisoformat(value) if value else None


def study_description(data: dict[str, Any]) -> StudyDescription:
    patient = dict(data["patient"])
    patient["birth_date"] = _date(patient["birth_date"])
    patient["other_ids"] = tuple(OtherPatientId(**other) for other in patient["other_ids"])
    return StudyDescription(
        **{
            **data,
            "patient": PatientInfo(**patient),
            "study_date": _date(data["study_date"]),
            "study_time": _time(data["study_time"]),
            "series": tuple(
                SeriesDescription(
                    **{
                        **series,
                        "instances": tuple(
                            ReferencedInstance(**instance) for instance in series["instances"]
                        ),
                    }
                )
                for series in data["series"]
            ),
        }
    )


def test_there_are_fixtures() -> None:
    assert len(DESCRIPTIONS) >= 2


@pytest.mark.parametrize("path", DESCRIPTIONS, ids=lambda path: path.stem)
def test_build_kos_makes_the_fixture_byte_for_byte(path: Path) -> None:
    spec = json.loads(path.read_text(encoding="utf-8"))
    study = study_description(spec["study"])
    built = build_kos(study, now=dt.datetime.fromisoformat(spec["now"]), uid_root=spec["uid_root"])
    manifest = path.with_suffix(".dcm")
    if os.environ.get("RELAIS_WRITE_FIXTURES") == "1":
        manifest.write_bytes(built)
    assert built == manifest.read_bytes(), f"{manifest.name} is no longer what build_kos makes"


@pytest.mark.parametrize("path", DESCRIPTIONS, ids=lambda path: path.stem)
def test_the_fixture_parses_back_to_its_description(path: Path) -> None:
    spec = json.loads(path.read_text(encoding="utf-8"))
    study = study_description(spec["study"])
    parsed = parse_kos(path.with_suffix(".dcm").read_bytes())
    sop_uid, series_uid = derive_kos_uids(study, uid_root=spec["uid_root"])
    assert parsed.sop_instance_uid == sop_uid
    assert parsed.patient.patient_id == study.patient.patient_id
    assert parsed.patient.issuer == study.patient.issuer
    assert parsed.study_description == study.study_description
    assert parsed.study_date == study.study_date
    assert parsed.study_time == study.study_time
    (referenced,) = parsed.studies
    assert referenced.study_instance_uid == study.study_instance_uid
    assert [
        (series.series_instance_uid, [i.sop_instance_uid for i in series.instances])
        for series in referenced.series
    ] == [
        (series.series_instance_uid, [i.sop_instance_uid for i in series.instances])
        for series in study.series
    ]
    for series in referenced.series:
        assert series.retrieve_ae_title == study.retrieve_ae_title
        assert series.retrieve_url == study.retrieve_url
    assert series_uid  # the KO series' UID is derived too (from the study UID only)
