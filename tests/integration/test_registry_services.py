"""Registering, replacing and deprecating manifests; the patient index behind them."""

from __future__ import annotations

import datetime as dt
import io

import pytest

from audit.events import EventCode
from audit.models import AuditEvent
from broker import identity, selectors
from broker.dicom.kos import normalise_ins_matricule, parse_kos
from broker.errors import Conflict, InvalidInput, UnprocessableManifest
from broker.models import (
    IdentifierLinkHistory,
    LinkCandidate,
    Manifest,
    ManifestInstance,
    ManifestSeries,
    ManifestStatus,
    Patient,
    PatientIdentifier,
)
from broker.services import manifest_deprecate, manifest_register, manifests_register
from tests.conftest import NOW, SYSTEM
from tests.registry_helpers import CT, MR, kos_for, study_uid

INS = "2850375123456"
INS_FULL = normalise_ins_matricule(INS)  # stored with its key


def register(region_institution, data, now=NOW):
    return manifest_register(data=data, institution=region_institution, actor=SYSTEM, now=now)


def test_a_new_manifest_is_registered_with_its_series_instances_and_audit_event(region):
    data = kos_for(region.chu, "100001", study=1, series=(("CT", CT, 3), ("MR", MR, 2)))

    result = register(region.chu, data)

    manifest = result.manifest
    assert result.outcome == "new"
    assert manifest.status == ManifestStatus.APPROVED
    assert manifest.study_instance_uid == study_uid(1)
    assert manifest.series_count == 2
    assert manifest.instance_count == 5
    assert manifest.modalities == ["CT", "MR"]
    assert manifest.kos_size == len(data)
    assert bytes(manifest.kos_bytes) == data
    assert manifest.source_identifier.value == "100001"
    assert manifest.source_identifier.issuer == "CHU-BELLECOMBE"
    assert ManifestSeries.objects.filter(manifest=manifest).count() == 2
    assert ManifestInstance.objects.filter(series__manifest=manifest).count() == 5
    event = AuditEvent.objects.get(code=EventCode.MANIFEST_REGISTER)
    assert event.participant_objects[0]["uid"] == study_uid(1)
    assert event.patient_id == str(manifest.source_identifier.patient.public_id)


def test_the_same_manifest_twice_changes_nothing(region):
    data = kos_for(region.chu, "100001", study=1)
    register(region.chu, data)
    events_before = AuditEvent.objects.count()

    again = register(region.chu, data)

    assert again.outcome == "unchanged"
    assert Manifest.objects.count() == 1
    assert ManifestInstance.objects.count() == 3
    assert AuditEvent.objects.count() == events_before


def test_the_same_sop_instance_uid_with_other_content_is_refused_and_audited(region):
    register(region.chu, kos_for(region.chu, "100001", study=1, sop_instance_uid="1.2.3.4.5"))
    other = kos_for(region.chu, "100001", study=2, sop_instance_uid="1.2.3.4.5")

    with pytest.raises(Conflict) as refused:
        register(region.chu, other)

    assert refused.value.code == "registry:manifest:uid-reused"
    assert Manifest.objects.count() == 1
    rejection = AuditEvent.objects.get(code=EventCode.MANIFEST_REJECT)
    assert rejection.details["error"] == "registry:manifest:uid-reused"


def test_a_new_manifest_for_the_same_study_replaces_the_previous_one(region):
    first = register(region.chu, kos_for(region.chu, "100001", study=1)).manifest

    second = register(
        region.chu,
        kos_for(region.chu, "100001", study=1, series=(("CT", CT, 3), ("CT", CT, 4))),
        now=NOW + dt.timedelta(hours=1),
    )

    first.refresh_from_db()
    assert second.outcome == "replaced"
    assert first.status == ManifestStatus.DEPRECATED
    assert first.replaced_by == second.manifest
    assert list(second.manifest.replaces.all()) == [first]
    assert first.deprecated_at == NOW + dt.timedelta(hours=1)
    # History kept: the old manifest and its references are still there.
    assert ManifestInstance.objects.filter(series__manifest=first).count() == 3
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REPLACE).count() == 1


def test_the_same_study_from_another_institution_does_not_replace(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))

    register(region.portmael, kos_for(region.portmael, "PM-555", study=1))

    assert Manifest.objects.filter(status=ManifestStatus.APPROVED).count() == 2


def test_a_study_whose_manifest_was_deprecated_gets_a_new_one_not_a_replacement(region):
    """The deprecated manifest is history: a new manifest for its study replaces nothing."""
    first = register(region.chu, kos_for(region.chu, "100001", study=1)).manifest
    manifest_deprecate(manifest=first, actor=SYSTEM, now=NOW, reason="published in error")

    again = register(
        region.chu,
        kos_for(region.chu, "100001", study=1, series=(("CT", CT, 3), ("CT", CT, 4))),
        now=NOW + dt.timedelta(hours=1),
    )

    first.refresh_from_db()
    assert again.outcome == "new"
    assert first.status == ManifestStatus.DEPRECATED
    assert first.replaced_by is None
    assert not AuditEvent.objects.filter(code=EventCode.MANIFEST_REPLACE).exists()


def test_a_third_manifest_replaces_the_approved_one_not_the_history(region):
    first = register(region.chu, kos_for(region.chu, "100001", study=1)).manifest
    second = register(
        region.chu,
        kos_for(region.chu, "100001", study=1, series=(("CT", CT, 3), ("CT", CT, 4))),
        now=NOW + dt.timedelta(hours=1),
    ).manifest

    third = register(
        region.chu,
        kos_for(region.chu, "100001", study=1, series=(("CT", CT, 3), ("MR", MR, 2))),
        now=NOW + dt.timedelta(hours=2),
    )

    first.refresh_from_db()
    second.refresh_from_db()
    assert third.outcome == "replaced"
    assert first.replaced_by == second
    assert second.replaced_by == third.manifest
    assert second.status == ManifestStatus.DEPRECATED
    assert (
        Manifest.objects.filter(
            study_instance_uid=study_uid(1), status=ManifestStatus.APPROVED
        ).get()
        == third.manifest
    )


def test_deprecating_a_manifest_keeps_it_and_audits(region):
    manifest = register(region.chu, kos_for(region.chu, "100001", study=1)).manifest

    manifest_deprecate(manifest=manifest, actor=SYSTEM, now=NOW, reason="study deleted at source")

    manifest.refresh_from_db()
    assert manifest.status == ManifestStatus.DEPRECATED
    event = AuditEvent.objects.get(code=EventCode.MANIFEST_DEPRECATE)
    assert event.details["reason"] == "study deleted at source"
    with pytest.raises(Conflict):
        manifest_deprecate(manifest=manifest, actor=SYSTEM, now=NOW, reason="again")


def test_a_deprecation_needs_a_reason(region):
    manifest = register(region.chu, kos_for(region.chu, "100001", study=1)).manifest
    with pytest.raises(InvalidInput):
        manifest_deprecate(manifest=manifest, actor=SYSTEM, now=NOW, reason="  ")


def test_a_manifest_under_another_institutions_issuer_is_refused_and_nothing_is_stored(region):
    data = kos_for(region.chu, "PM-555", study=1, issuer="CH-PORTMAEL")

    with pytest.raises(UnprocessableManifest) as refused:
        register(region.chu, data)

    assert refused.value.code == "kos:unknown-issuer"
    assert Manifest.objects.count() == 0
    assert Patient.objects.count() == 0
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT).count() == 1


def test_garbage_is_refused_with_a_specific_error_and_only_the_refusal_is_audited(region):
    with pytest.raises(UnprocessableManifest) as refused:
        register(region.chu, b"this is not DICOM at all" * 10)

    assert refused.value.code.startswith("kos:")
    assert Manifest.objects.count() == 0
    assert PatientIdentifier.objects.count() == 0
    assert list(AuditEvent.objects.values_list("code", flat=True).order_by("-sequence")[:1]) == [
        EventCode.MANIFEST_REJECT
    ]


def test_an_inactive_institution_cannot_publish(region):
    region.staubin.active = False
    region.staubin.save()
    with pytest.raises(Conflict):
        register(region.staubin, kos_for(region.staubin, "SA-1", study=9))


# ---------------------------------------------------------------------------
# Patient identity


def test_a_local_id_resolves_to_one_regional_patient(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))
    register(region.chu, kos_for(region.chu, "100001", study=2))

    assert Patient.objects.count() == 1
    patient = selectors.patient_by_identifier(issuer="CHU-BELLECOMBE", value="100001")
    assert patient is not None
    assert patient.identifiers.count() == 1


def test_a_qualified_ins_links_local_ids_across_hospitals(region):
    chu = register(region.chu, kos_for(region.chu, "100001", study=1, ins=INS)).manifest
    pm = register(region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=INS)).manifest

    chu.refresh_from_db()
    pm.refresh_from_db()
    patient = chu.source_identifier.patient
    assert pm.source_identifier.patient == patient
    values = set(patient.identifiers.values_list("value", flat=True))
    assert values == {"100001", "PM-555", INS_FULL}
    ins = patient.identifiers.get(value=INS_FULL)
    assert ins.qualified
    assert ins.test
    # Any identifier finds both hospitals' manifests.
    for issuer, value in [
        ("CHU-BELLECOMBE", "100001"),
        ("CH-PORTMAEL", "PM-555"),
        ("1.2.250.1.213.1.4.10", INS),
    ]:
        found = selectors.patient_by_identifier(issuer=issuer, value=value)
        page = selectors.manifest_page(
            scope=Manifest.objects.all(),
            filters=selectors.ManifestFilters(patient=found),
            cursor=None,
            limit=10,
        )
        assert {m.sop_instance_uid for m in page.items} == {
            chu.sop_instance_uid,
            pm.sop_instance_uid,
        }
    assert AuditEvent.objects.filter(code=EventCode.PATIENT_LINK).count() == 1


def test_an_ins_published_later_merges_patients_created_earlier(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))
    register(region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=INS))
    assert Patient.objects.filter(identifiers__isnull=False).distinct().count() == 2

    register(region.chu, kos_for(region.chu, "100001", study=3, ins=INS))

    chu_id = PatientIdentifier.objects.get(value="100001")
    pm_id = PatientIdentifier.objects.get(value="PM-555")
    assert chu_id.patient_id == pm_id.patient_id
    assert Manifest.objects.filter(source_identifier__patient=chu_id.patient).count() == 3
    assert IdentifierLinkHistory.objects.filter(
        reason=IdentifierLinkHistory.Reason.INS_MATCH
    ).exists()


def test_a_demographic_match_without_ins_is_only_a_candidate(region):
    register(
        region.staubin,
        kos_for(
            region.staubin,
            "SA-0042",
            study=4,
            family="LEROY",
            given="Jean",
            birth=dt.date(1950, 11, 2),
            sex="M",
        ),
    )
    register(
        region.chu,
        kos_for(
            region.chu,
            "100777",
            study=5,
            family="Leroy",
            given="Jean Pierre",
            birth=dt.date(1950, 11, 2),
            sex="M",
        ),
    )

    a = PatientIdentifier.objects.get(value="SA-0042")
    b = PatientIdentifier.objects.get(value="100777")
    assert a.patient_id != b.patient_id
    candidate = LinkCandidate.objects.get()
    assert candidate.status == LinkCandidate.Status.PENDING
    assert {candidate.identifier_a_id, candidate.identifier_b_id} == {a.id, b.id}


def test_confirming_a_candidate_links_and_rejecting_does_not(region):
    register(
        region.staubin,
        kos_for(
            region.staubin,
            "SA-0042",
            study=4,
            family="LEROY",
            given="Jean",
            birth=dt.date(1950, 11, 2),
            sex="M",
        ),
    )
    register(
        region.chu,
        kos_for(
            region.chu,
            "100777",
            study=5,
            family="LEROY",
            given="Jean",
            birth=dt.date(1950, 11, 2),
            sex="M",
        ),
    )
    candidate = LinkCandidate.objects.get()

    identity.candidate_decide(candidate=candidate, confirm=True, actor=SYSTEM, now=NOW)

    a = PatientIdentifier.objects.get(value="SA-0042")
    b = PatientIdentifier.objects.get(value="100777")
    assert a.patient_id == b.patient_id
    with pytest.raises(Conflict):
        identity.candidate_decide(candidate=candidate, confirm=False, actor=SYSTEM, now=NOW)


def test_unlinking_moves_the_identifier_and_its_manifests_and_keeps_history(region):
    register(region.chu, kos_for(region.chu, "100001", study=1, ins=INS))
    pm_manifest = register(
        region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=INS)
    ).manifest
    pm = PatientIdentifier.objects.get(value="PM-555")
    shared = pm.patient

    new_patient = identity.patient_unlink(
        identifier=pm, actor=SYSTEM, now=NOW, comment="homonym: INS entered on the wrong file"
    )

    pm.refresh_from_db()
    assert pm.patient == new_patient
    assert pm.auto_link_blocked
    assert shared.identifiers.filter(value="100001").exists()
    # No manifest lost: it follows its identifier.
    pm_manifest.refresh_from_db()
    assert pm_manifest.source_identifier.patient == new_patient
    assert Manifest.objects.count() == 2
    assert list(pm.history.values_list("reason", flat=True)) == ["created", "ins_match", "unlink"]
    assert AuditEvent.objects.filter(code=EventCode.PATIENT_UNLINK).count() == 2


def test_after_an_unlink_the_shared_ins_only_proposes_a_candidate(region):
    register(region.chu, kos_for(region.chu, "100001", study=1, ins=INS))
    register(region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=INS))
    pm = PatientIdentifier.objects.get(value="PM-555")
    identity.patient_unlink(identifier=pm, actor=SYSTEM, now=NOW, comment="wrong INS")

    register(region.portmael, kos_for(region.portmael, "PM-555", study=3, ins=INS))

    pm.refresh_from_db()
    assert pm.patient_id != PatientIdentifier.objects.get(value="100001").patient_id
    assert LinkCandidate.objects.filter(status=LinkCandidate.Status.PENDING).count() == 1


def test_an_unlink_needs_a_reason_and_a_patient_with_several_identifiers(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))
    identifier = PatientIdentifier.objects.get(value="100001")
    with pytest.raises(InvalidInput):
        identity.patient_unlink(identifier=identifier, actor=SYSTEM, now=NOW, comment="")
    with pytest.raises(Conflict):
        identity.patient_unlink(identifier=identifier, actor=SYSTEM, now=NOW, comment="why")


# ---------------------------------------------------------------------------
# Selectors


def test_manifests_are_filtered_by_date_modality_institution_and_status(region):
    register(
        region.chu, kos_for(region.chu, "100001", study=1, ins=INS, study_date=dt.date(2026, 1, 5))
    )
    register(
        region.chu,
        kos_for(
            region.chu,
            "100001",
            study=2,
            ins=INS,
            study_date=dt.date(2026, 6, 5),
            series=(("MR", MR, 2),),
        ),
    )
    old = register(
        region.portmael,
        kos_for(region.portmael, "PM-555", study=3, ins=INS, study_date=dt.date(2025, 6, 5)),
    ).manifest
    manifest_deprecate(manifest=old, actor=SYSTEM, now=NOW, reason="test")
    patient = selectors.patient_by_identifier(issuer="CH-PORTMAEL", value="PM-555")

    def uids(**filters):
        page = selectors.manifest_page(
            scope=Manifest.objects.all(),
            filters=selectors.ManifestFilters(patient=patient, **filters),
            cursor=None,
            limit=50,
        )
        return [m.study_instance_uid for m in page.items]

    assert uids() == [study_uid(2), study_uid(1)]
    assert uids(status=None) == [study_uid(2), study_uid(1), study_uid(3)]
    assert uids(modality="MR") == [study_uid(2)]
    assert uids(date_from=dt.date(2026, 3, 1)) == [study_uid(2)]
    assert uids(date_to=dt.date(2026, 3, 1)) == [study_uid(1)]
    assert uids(institution=region.portmael, status=ManifestStatus.DEPRECATED) == [study_uid(3)]


def test_keyset_pages_cover_every_manifest_once_undated_last(region):
    for n in range(1, 8):
        register(
            region.chu,
            kos_for(
                region.chu,
                "100001",
                study=n,
                study_date=None if n in (3, 6) else dt.date(2026, 1, n % 3 + 1),
            ),
        )
    patient = selectors.patient_by_identifier(issuer="CHU-BELLECOMBE", value="100001")
    seen, cursor = [], None
    while True:
        page = selectors.manifest_page(
            scope=Manifest.objects.all(),
            filters=selectors.ManifestFilters(patient=patient),
            cursor=cursor,
            limit=2,
        )
        seen.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(seen) == 7
    assert len({m.id for m in seen}) == 7
    dates = [m.study_date for m in seen]
    dated = [d for d in dates if d is not None]
    assert dated == sorted(dated, reverse=True)
    assert dates[-2:] == [None, None]


# ---------------------------------------------------------------------------
# Batches (imports, harvests): the same semantics as one document after another


def register_batch(institution, documents):
    return manifests_register(documents=documents, institution=institution, actor=SYSTEM, now=NOW)


def test_a_batch_registers_each_document_and_rejects_only_the_bad_one(region):
    good = [kos_for(region.chu, f"2000{n}", study=n) for n in range(1, 4)]

    results = register_batch(region.chu, [good[0], b"garbage" * 20, good[1], good[2]])

    assert [r.outcome for r in results] == ["new", "rejected", "new", "new"]
    assert results[1].error.code.startswith("kos:")
    assert Manifest.objects.count() == 3
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REGISTER).count() == 3
    assert AuditEvent.objects.filter(code=EventCode.MANIFEST_REJECT).count() == 1


def test_the_same_document_twice_in_a_batch_is_registered_once(region):
    data = kos_for(region.chu, "100001", study=1)

    results = register_batch(region.chu, [data, data])

    assert [r.outcome for r in results] == ["new", "unchanged"]
    assert results[0].manifest == results[1].manifest
    assert Manifest.objects.count() == 1


def test_a_later_document_of_the_same_study_in_a_batch_replaces_the_earlier(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))
    second = kos_for(region.chu, "100001", study=1, series=(("CT", CT, 4),))
    third = kos_for(region.chu, "100001", study=1, series=(("CT", CT, 5),))

    results = register_batch(region.chu, [second, third])

    assert [r.outcome for r in results] == ["replaced", "replaced"]
    first, second_m, third_m = Manifest.objects.order_by("id")
    assert first.replaced_by == second_m
    assert second_m.replaced_by == third_m
    assert [m.status for m in (first, second_m, third_m)] == [
        ManifestStatus.DEPRECATED,
        ManifestStatus.DEPRECATED,
        ManifestStatus.APPROVED,
    ]


def test_a_batch_links_patients_by_ins_and_creates_each_patient_once(region):
    documents = [
        kos_for(region.chu, "100001", study=1),
        kos_for(region.chu, "100001", study=2, ins=INS),
        kos_for(region.chu, "100001", study=3),
    ]
    register_batch(region.chu, documents)
    register_batch(region.portmael, [kos_for(region.portmael, "PM-555", study=4, ins=INS)])

    chu = PatientIdentifier.objects.get(value="100001")
    assert Manifest.objects.filter(source_identifier=chu).count() == 3
    assert PatientIdentifier.objects.get(value="PM-555").patient_id == chu.patient_id
    assert Patient.objects.filter(identifiers__isnull=False).distinct().count() == 1


def test_a_study_registered_under_another_patient_is_refused(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))

    results = register_batch(
        region.chu, [kos_for(region.chu, "999999", study=1, family="AUTRE", given="Jean")]
    )

    assert results[0].error.code == "registry:manifest:patient-mismatch"
    assert Manifest.objects.count() == 1
    assert not PatientIdentifier.objects.filter(value="999999").exists()


def test_a_batch_stores_each_manifest_and_its_instances_as_the_service_built_them(region):
    # On PostgreSQL a batch's manifests and instances go by COPY: read back, they are the
    # rows the service built, with the IDs it was given.
    documents = [
        kos_for(region.chu, f"4000{n}", study=n, series=(("CT", CT, 3), ("MR", MR, n)))
        for n in range(1, 4)
    ]

    results = register_batch(region.chu, documents)

    fields = [field.attname for field in Manifest._meta.concrete_fields]
    for result, data in zip(results, documents, strict=True):
        assert result.manifest is not None
        stored = Manifest.objects.get(pk=result.manifest.pk)
        assert {f: _plain(getattr(stored, f)) for f in fields} == {
            f: _plain(getattr(result.manifest, f)) for f in fields
        }
        series_fields = [field.attname for field in ManifestSeries._meta.concrete_fields]
        kos = parse_kos(data)
        assert sorted(
            tuple(getattr(row, f) for f in series_fields if f not in ("id", "manifest_id"))
            for row in ManifestSeries.objects.filter(manifest=stored)
        ) == sorted(
            (
                study.study_instance_uid,
                series.series_instance_uid,
                series.modality or "",
                series.body_part or "",
                series.retrieve_ae_title or "",
                series.retrieve_location_uid or "",
                series.retrieve_url or "",
                len(series.instances),
            )
            for study in kos.studies
            for series in study.series
        )
        assert sorted(
            ManifestInstance.objects.filter(series__manifest=stored).values_list(
                "series__series_instance_uid", "sop_instance_uid", "sop_class_uid"
            )
        ) == sorted(
            (series.series_instance_uid, instance.sop_instance_uid, instance.sop_class_uid)
            for study in kos.studies
            for series in study.series
            for instance in series.instances
        )


def _plain(value: object) -> object:
    return bytes(value) if isinstance(value, memoryview) else value


def test_a_batch_appends_one_unbroken_audit_chain(region):
    register_batch(region.chu, [kos_for(region.chu, f"3000{n}", study=n) for n in range(1, 6)])

    from audit.services import audit_verify

    result = audit_verify(actor=SYSTEM, now=NOW)
    assert result.intact
    sequences = list(AuditEvent.objects.order_by("sequence").values_list("sequence", flat=True))
    assert sequences == list(range(1, len(sequences) + 1))


def test_an_unlinked_identifier_is_not_relinked_through_another_identifier_of_its_patient(region):
    register(region.chu, kos_for(region.chu, "100001", study=1, ins=INS))
    register(region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=INS))
    chu = PatientIdentifier.objects.get(value="100001")
    new_patient = identity.patient_unlink(identifier=chu, actor=SYSTEM, now=NOW, comment="wrong")
    # Another hospital's identifier joins the unlinked patient (say, by a manual link)...
    register(region.staubin, kos_for(region.staubin, "SA-9", study=3, family="X", given="Y"))
    staubin = PatientIdentifier.objects.get(value="SA-9")
    identity.patient_link(identifier=staubin, to_patient=new_patient, actor=SYSTEM, now=NOW)

    # ...then publishes with the INS: the unlink holds, a person reviews instead.
    register(
        region.staubin, kos_for(region.staubin, "SA-9", study=4, family="X", given="Y", ins=INS)
    )

    chu.refresh_from_db()
    assert chu.patient == new_patient
    assert LinkCandidate.objects.filter(status=LinkCandidate.Status.PENDING).exists()


def test_a_patient_with_another_ins_is_not_merged_silently(region):
    other_ins = "1850375123456"
    register(region.chu, kos_for(region.chu, "100001", study=1, ins=INS))
    register(region.portmael, kos_for(region.portmael, "PM-555", study=2, ins=other_ins))

    register(region.chu, kos_for(region.chu, "100001", study=3, ins=other_ins))

    chu = PatientIdentifier.objects.get(value="100001")
    pm = PatientIdentifier.objects.get(value="PM-555")
    assert chu.patient_id != pm.patient_id
    assert LinkCandidate.objects.filter(
        status=LinkCandidate.Status.PENDING, matched_on=["ins"]
    ).exists()


def test_a_batch_creates_a_new_patient_with_their_ins_and_another_hospital_links_to_it(region):
    register_batch(
        region.portmael,
        [
            kos_for(region.portmael, "PM-1", study=1, ins=INS),
            kos_for(region.portmael, "PM-1", study=2, ins=INS),
        ],
    )
    pm = PatientIdentifier.objects.get(value="PM-1")
    assert set(pm.patient.identifiers.values_list("value", flat=True)) == {"PM-1", INS_FULL}
    assert AuditEvent.objects.filter(code=EventCode.PATIENT_CREATE).count() == 1

    register_batch(region.chu, [kos_for(region.chu, "100001", study=3, ins=INS)])

    assert PatientIdentifier.objects.get(value="100001").patient_id == pm.patient_id


def test_two_new_local_ids_sharing_an_ins_in_one_batch_become_one_patient(region):
    register_batch(
        region.chu,
        [
            kos_for(region.chu, "100001", study=1, ins=INS),
            kos_for(region.chu, "100002", study=2, ins=INS),
        ],
    )
    a = PatientIdentifier.objects.get(value="100001")
    b = PatientIdentifier.objects.get(value="100002")
    assert a.patient_id == b.patient_id
    assert PatientIdentifier.objects.filter(value=INS_FULL).count() == 1


def _two_study_kos(institution, first: int, second: int) -> bytes:
    import pydicom
    from pydicom.uid import generate_uid

    from tests.dicom_factories import dataset_to_bytes

    ds = pydicom.dcmread(io.BytesIO(kos_for(institution, "100001", study=first)))
    other = pydicom.dcmread(io.BytesIO(kos_for(institution, "100001", study=second)))
    ds.CurrentRequestedProcedureEvidenceSequence.extend(
        other.CurrentRequestedProcedureEvidenceSequence
    )
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return dataset_to_bytes(ds)


def test_a_manifest_replaces_only_manifests_it_covers_entirely(region):
    both = register(region.chu, _two_study_kos(region.chu, 1, 2)).manifest
    assert set(both.series.values_list("study_instance_uid", flat=True)) == {
        study_uid(1),
        study_uid(2),
    }

    with pytest.raises(Conflict) as refused:
        register(region.chu, kos_for(region.chu, "100001", study=2))

    assert refused.value.code == "registry:manifest:partial-overlap"
    both.refresh_from_db()
    assert both.status == ManifestStatus.APPROVED
    # A manifest of both studies again replaces it.
    assert register(region.chu, _two_study_kos(region.chu, 2, 1)).outcome == "replaced"


def test_identity_changes_are_audited_new_ins_and_changed_traits(region):
    register(region.chu, kos_for(region.chu, "100001", study=1))
    register(region.chu, kos_for(region.chu, "100001", study=2, ins=INS))
    register(region.chu, kos_for(region.chu, "100001", study=3, ins=INS, family="DUPONT-MARTIN"))

    added = AuditEvent.objects.get(code=EventCode.IDENTIFIER_ADD)
    assert added.details["identifier"]["value"] == INS_FULL
    traits = AuditEvent.objects.filter(code=EventCode.IDENTIFIER_TRAITS).last()
    assert "family_name" in traits.details["changed"]
