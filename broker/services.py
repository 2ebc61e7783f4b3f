"""Registry services: every state change of institutions and manifests.

Each service runs in one transaction and writes its audit event in that transaction.
A refused manifest changes nothing but leaves the audit record of its refusal.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from audit.events import EventCode, Outcome
from audit.services import Actor, audit_record
from broker.dicom.kos import KOSError, ParsedKOS, national_ids, parse_kos, resolve_patient_id
from broker.errors import Conflict, InvalidInput, NotFound, UnprocessableManifest
from broker.identity import identity_resolve_for_manifest, patient_ref
from broker.models import (
    Institution,
    InstitutionAPIKey,
    Manifest,
    ManifestInstance,
    ManifestSeries,
    ManifestStatus,
)

# ---------------------------------------------------------------------------
# Institutions

INSTITUTION_FIELDS = (
    "name",
    "patient_id_issuer",
    "patient_id_issuer_oid",
    "ae_title",
    "dicom_host",
    "dicom_port",
    "dicomweb_url",
    "active",
)


def _validate(instance: Institution) -> None:
    try:
        instance.full_clean()
    except ValidationError as exc:
        messages = "; ".join(
            f"{field}: {' '.join(errors)}" for field, errors in exc.message_dict.items()
        )
        raise InvalidInput(
            messages, code="registry:institution:invalid", errors=exc.message_dict
        ) from exc


def institution_create(
    *,
    finess: str,
    name: str,
    patient_id_issuer: str,
    actor: Actor,
    now: datetime,
    patient_id_issuer_oid: str = "",
    ae_title: str = "",
    dicom_host: str = "",
    dicom_port: int | None = None,
    dicomweb_url: str = "",
    active: bool = True,
) -> Institution:
    """Onboard an institution (same service for the CLI and the administrators' API)."""
    institution = Institution(
        finess=finess.strip().upper(),
        name=name.strip(),
        patient_id_issuer=patient_id_issuer.strip(),
        patient_id_issuer_oid=patient_id_issuer_oid.strip(),
        ae_title=ae_title.strip(),
        dicom_host=dicom_host.strip(),
        dicom_port=dicom_port,
        dicomweb_url=dicomweb_url.strip(),
        active=active,
        created_at=now,
        updated_at=now,
    )
    _check_endpoints(institution)
    _validate(institution)
    with transaction.atomic():
        institution.save()
        audit_record(
            code=EventCode.INSTITUTION_CREATE,
            actor=actor,
            now=now,
            objects=[{"type": "institution", "finess": institution.finess}],
            details={field: getattr(institution, field) for field in INSTITUTION_FIELDS},
        )
    return institution


def _check_endpoints(institution: Institution) -> None:
    dimse = (institution.ae_title, institution.dicom_host, institution.dicom_port)
    if any(dimse) and not all(dimse):
        raise InvalidInput(
            "A DICOM endpoint needs an AE title, a host and a port together",
            code="registry:institution:incomplete-endpoint",
        )


def institution_update(
    *, institution: Institution, actor: Actor, now: datetime, **changes: Any
) -> Institution:
    unknown = set(changes) - set(INSTITUTION_FIELDS)
    if unknown:
        raise InvalidInput(
            f"Unknown or read-only fields: {', '.join(sorted(unknown))}",
            code="registry:institution:invalid",
        )
    with transaction.atomic():
        institution = Institution.objects.select_for_update().get(pk=institution.pk)
        before = {field: getattr(institution, field) for field in changes}
        for field, value in changes.items():
            setattr(institution, field, value.strip() if isinstance(value, str) else value)
        institution.updated_at = now
        _check_endpoints(institution)
        _validate(institution)
        institution.save()
        audit_record(
            code=EventCode.INSTITUTION_UPDATE,
            actor=actor,
            now=now,
            objects=[{"type": "institution", "finess": institution.finess}],
            details={
                "before": before,
                "after": {field: getattr(institution, field) for field in changes},
            },
        )
    return institution


def api_key_create(
    *, institution: Institution, name: str, actor: Actor, now: datetime
) -> tuple[InstitutionAPIKey, str]:
    """A new API key for an institution's system; the clear key is returned once, stored hashed."""
    with transaction.atomic():
        key_object, key = InstitutionAPIKey.objects.create_key(
            name=name or f"{institution.finess} system", institution=institution
        )
        audit_record(
            code=EventCode.API_KEY_CREATE,
            actor=actor,
            now=now,
            objects=[
                {"type": "api-key", "prefix": key_object.prefix, "finess": institution.finess}
            ],
            details={"name": key_object.name},
        )
    return key_object, key


# ---------------------------------------------------------------------------
# Manifests

# What a column can hold; a KOS value beyond it is refused, never truncated.
_LIMITS = {
    "accession_number": 64,
    "study_description": 256,
    "patient_id": 64,
    "retrieve_ae_title": 64,
    "retrieve_url": 1024,
    "modality": 16,
    "body_part": 64,
}


@dataclass(frozen=True)
class RegistrationResult:
    manifest: Manifest
    outcome: Literal["new", "unchanged", "replaced"]
    replaced: tuple[Manifest, ...] = ()


def _check_lengths(kos: ParsedKOS) -> None:
    def check(name: str, value: str | None, where: str) -> None:
        if value and len(value) > _LIMITS[name]:
            raise KOSError(
                "kos:value-too-long",
                f"{where} is {len(value)} characters long; at most {_LIMITS[name]} are accepted",
            )

    check("accession_number", kos.accession_number, "AccessionNumber (0008,0050)")
    check("study_description", kos.study_description, "StudyDescription (0008,1030)")
    check("patient_id", kos.patient.patient_id, "PatientID (0010,0020)")
    for study in kos.studies:
        check("accession_number", study.accession_number, "AccessionNumber of a referenced study")
        for series in study.series:
            check("retrieve_ae_title", series.retrieve_ae_title, "RetrieveAETitle (0008,0054)")
            check("retrieve_url", series.retrieve_url, "RetrieveURL (0008,1190)")
            check("modality", series.modality, "Modality of a referenced series")
            check("body_part", series.body_part, "BodyPartExamined of a referenced series")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_register(
    *,
    data: bytes,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
) -> RegistrationResult:
    """Register a KOS manifest published by ``institution``.

    Idempotent: the same KOS twice changes nothing. The same SOP Instance UID with other
    content is refused. A manifest for a study that already has an approved manifest from
    the same source replaces it (the old one is deprecated, linked to the new one).
    Any refusal raises ``UnprocessableManifest`` (or ``Conflict``) after the refusal is
    audited in a transaction of its own; nothing else is stored.
    """
    correlation_id = correlation_id or uuid.uuid4()
    sha256 = _sha256(data)
    try:
        limit = settings.RELAIS_MAX_MANIFEST_BYTES
        if len(data) > limit:
            raise KOSError("kos:too-large", f"The manifest is larger than {limit} bytes")
        return _register(
            data=data,
            sha256=sha256,
            institution=institution,
            actor=actor,
            now=now,
            correlation_id=correlation_id,
        )
    except KOSError as exc:
        manifest_rejection_audit(
            code=exc.code,
            message=exc.message,
            data=data,
            institution=institution,
            actor=actor,
            now=now,
            correlation_id=correlation_id,
        )
        raise UnprocessableManifest(exc.message, code=exc.code) from exc
    except (Conflict, InvalidInput) as exc:
        manifest_rejection_audit(
            code=exc.code,
            message=exc.detail,
            data=data,
            institution=institution,
            actor=actor,
            now=now,
            correlation_id=correlation_id,
        )
        raise


def manifest_rejection_audit(
    *,
    code: str,
    message: str,
    data: bytes,
    institution: Institution | None,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
) -> None:
    """Record a refused publication in a transaction of its own (nothing else is stored)."""
    sha256 = _sha256(data)
    size = len(data)
    with transaction.atomic():
        audit_record(
            code=EventCode.MANIFEST_REJECT,
            actor=actor,
            now=now,
            outcome=Outcome.MINOR_FAILURE,
            correlation_id=correlation_id,
            objects=[{"type": "document", "sha256": sha256, "size": size}],
            details={
                "error": code,
                "message": message,
                "institution": institution.finess if institution else "",
            },
        )


def _register(
    *,
    data: bytes,
    sha256: str,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
) -> RegistrationResult:
    if not institution.active:
        raise Conflict(
            f"Institution {institution.finess} is not active: it cannot publish",
            code="registry:institution:inactive",
        )
    kos = parse_kos(data)
    _check_lengths(kos)
    primary = resolve_patient_id(
        kos,
        institution_issuer=institution.patient_id_issuer,
        institution_issuer_oid=institution.patient_id_issuer_oid or None,
    )
    nationals = national_ids(kos)
    # Two concurrent registrations of the same new patient or manifest may collide on a
    # unique constraint (PostgreSQL); the second attempt then sees the first one's rows.
    for attempt in range(3):
        try:
            with transaction.atomic():
                return _register_parsed(
                    kos=kos,
                    data=data,
                    sha256=sha256,
                    primary=primary,
                    nationals=nationals,
                    institution=institution,
                    actor=actor,
                    now=now,
                    correlation_id=correlation_id,
                )
        except IntegrityError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _register_parsed(
    *,
    kos: ParsedKOS,
    data: bytes,
    sha256: str,
    primary: Any,
    nationals: Any,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
) -> RegistrationResult:
    existing = (
        Manifest.objects.select_for_update()
        .filter(sop_instance_uid=kos.sop_instance_uid)
        .select_related("source_institution")
        .first()
    )
    if existing is not None:
        if existing.kos_sha256 == sha256 and existing.source_institution_id == institution.id:
            return RegistrationResult(manifest=existing, outcome="unchanged")
        raise Conflict(
            f"SOP Instance UID {kos.sop_instance_uid} is already registered with other content; "
            "a changed manifest needs a new SOP Instance UID",
            code="registry:manifest:uid-reused",
        )

    identity = identity_resolve_for_manifest(
        institution=institution,
        primary=primary,
        nationals=nationals,
        traits=kos.patient,
        actor=actor,
        correlation_id=correlation_id,
        now=now,
    )
    study_uids = [study.study_instance_uid for study in kos.studies]
    replaced = list(
        Manifest.objects.select_for_update()
        .filter(
            source_institution=institution,
            status=ManifestStatus.APPROVED,
            id__in=ManifestSeries.objects.filter(study_instance_uid__in=study_uids).values(
                "manifest_id"
            ),
        )
        .order_by("id")
    )
    for old in replaced:
        if old.source_identifier.patient_id != identity.identifier.patient_id:
            raise Conflict(
                f"Study {old.study_instance_uid} is already registered for another patient "
                f"(manifest {old.sop_instance_uid}); deprecate it first",
                code="registry:manifest:patient-mismatch",
            )
        old.status = ManifestStatus.DEPRECATED
        old.deprecated_at = now
        old.save(update_fields=["status", "deprecated_at"])

    primary_study = kos.studies[0]
    first_series = primary_study.series[0]
    manifest = Manifest.objects.create(
        sop_instance_uid=kos.sop_instance_uid,
        study_instance_uid=primary_study.study_instance_uid,
        accession_number=primary_study.accession_number or kos.accession_number or "",
        study_date=kos.study_date,
        study_time=kos.study_time,
        study_description=kos.study_description,
        modalities=list(kos.modalities),
        body_parts=list(kos.body_parts),
        series_count=kos.series_count,
        instance_count=kos.instance_count,
        source_institution=institution,
        source_identifier=identity.identifier,
        retrieve_ae_title=first_series.retrieve_ae_title or "",
        retrieve_location_uid=first_series.retrieve_location_uid or "",
        retrieve_url=first_series.retrieve_url or "",
        status=ManifestStatus.APPROVED,
        kos_bytes=data,
        kos_sha256=sha256,
        kos_size=len(data),
        registered_at=now,
    )
    if replaced:
        Manifest.objects.filter(id__in=[old.id for old in replaced]).update(replaced_by=manifest)
    series_rows = ManifestSeries.objects.bulk_create(
        ManifestSeries(
            manifest=manifest,
            study_instance_uid=study.study_instance_uid,
            series_instance_uid=series.series_instance_uid,
            modality=series.modality or "",
            body_part=series.body_part or "",
            retrieve_ae_title=series.retrieve_ae_title or "",
            retrieve_location_uid=series.retrieve_location_uid or "",
            retrieve_url=series.retrieve_url or "",
            instance_count=len(series.instances),
        )
        for study in kos.studies
        for series in study.series
    )
    parsed_series = [series for study in kos.studies for series in study.series]
    ManifestInstance.objects.bulk_create(
        (
            ManifestInstance(
                series=row,
                sop_instance_uid=instance.sop_instance_uid,
                sop_class_uid=instance.sop_class_uid,
            )
            for row, series in zip(series_rows, parsed_series, strict=True)
            for instance in series.instances
        ),
        batch_size=2000,
    )
    audit_record(
        code=EventCode.MANIFEST_REPLACE if replaced else EventCode.MANIFEST_REGISTER,
        actor=actor,
        now=now,
        patient=patient_ref(identity.identifier.patient),
        correlation_id=correlation_id,
        objects=[
            {
                "type": "study",
                "uid": study.study_instance_uid,
                "accession": study.accession_number or "",
                "instances": sum(len(s.instances) for s in study.series),
            }
            for study in kos.studies
        ],
        details={
            "manifest": kos.sop_instance_uid,
            "sha256": sha256,
            "size": len(data),
            "institution": institution.finess,
            "source_patient_id": {
                "issuer": identity.identifier.issuer,
                "value": identity.identifier.value,
            },
            "replaces": [old.sop_instance_uid for old in replaced],
            "patient_created": identity.created,
            "patient_linked": identity.linked,
            "candidates": [candidate.id for candidate in identity.candidates],
        },
    )
    return RegistrationResult(
        manifest=manifest,
        outcome="replaced" if replaced else "new",
        replaced=tuple(replaced),
    )


def manifest_deprecate(*, manifest: Manifest, actor: Actor, now: datetime, reason: str) -> Manifest:
    """Deprecate a manifest (the study is gone from the source, or was published in error)."""
    if not reason.strip():
        raise InvalidInput("A deprecation needs a reason", code="registry:manifest:no-reason")
    with transaction.atomic():
        locked = Manifest.objects.select_for_update().filter(pk=manifest.pk).first()
        if locked is None:
            raise NotFound("No such manifest")
        if locked.status == ManifestStatus.DEPRECATED:
            raise Conflict(
                f"Manifest {locked.sop_instance_uid} is already deprecated",
                code="registry:manifest:already-deprecated",
            )
        locked.status = ManifestStatus.DEPRECATED
        locked.deprecated_at = now
        locked.save(update_fields=["status", "deprecated_at"])
        audit_record(
            code=EventCode.MANIFEST_DEPRECATE,
            actor=actor,
            now=now,
            patient=patient_ref(locked.source_identifier.patient),
            objects=[
                {
                    "type": "study",
                    "uid": locked.study_instance_uid,
                    "accession": locked.accession_number,
                    "instances": locked.instance_count,
                }
            ],
            details={"manifest": locked.sop_instance_uid, "reason": reason},
        )
    return locked
