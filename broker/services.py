"""Registry services: every state change of institutions and manifests.

Each service runs in one transaction and writes its audit event in that transaction.
A refused manifest changes nothing but leaves the audit record of its refusal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from audit.events import EventCode
from audit.services import Actor, audit_record
from broker.dicom.kos import INS_NIA_OID, INS_NIA_TEST_OID, INS_NIR_OID, INS_NIR_TEST_OID
from broker.errors import Conflict, InvalidInput, NotFound
from broker.identity import patient_ref
from broker.models import (
    Institution,
    InstitutionAPIKey,
    Manifest,
    ManifestStatus,
)
from broker.registration import (
    RegistrationResult,
    manifest_register,
    manifest_rejection_audit,
    manifests_register,
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
    "dicom_tls_subject",
    "archive_transport",
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
    dicom_tls_subject: str = "",
    archive_transport: str = "",
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
        dicom_tls_subject=dicom_tls_subject.strip(),
        archive_transport=archive_transport,
        active=active,
        created_at=now,
        updated_at=now,
    )
    _check_endpoints(institution)
    _check_patient_domain(institution)
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


def _check_patient_domain(institution: Institution) -> None:
    national = {INS_NIR_OID, INS_NIA_OID, INS_NIR_TEST_OID, INS_NIA_TEST_OID}
    if {institution.patient_id_issuer, institution.patient_id_issuer_oid} & national:
        raise InvalidInput(
            "The national INS domain cannot be an institution's local patient ID domain",
            code="registry:institution:ins-domain",
        )


def _check_endpoints(institution: Institution) -> None:
    dimse = (institution.ae_title, institution.dicom_host, institution.dicom_port)
    if any(dimse) and not all(dimse):
        raise InvalidInput(
            "A DICOM endpoint needs an AE title, a host and a port together",
            code="registry:institution:incomplete-endpoint",
        )
    if institution.archive_transport == "dicomweb" and not institution.dicomweb_url:
        raise InvalidInput(
            "The DICOMweb transport needs the archive's DICOMweb URL",
            code="registry:institution:incomplete-endpoint",
        )
    if institution.archive_transport == "dimse" and not institution.has_dimse:
        raise InvalidInput(
            "The DIMSE transport needs the archive's AE title, host and port",
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
        domain_changed = any(
            before.get(field, getattr(institution, field)) != getattr(institution, field)
            for field in ("patient_id_issuer", "patient_id_issuer_oid")
        )
        if domain_changed and institution.patient_identifiers.exists():
            raise Conflict(
                "The institution's patients are already known under this domain: its issuer "
                "cannot change",
                code="registry:institution:domain-in-use",
            )
        _check_patient_domain(institution)
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
# Manifests (registration lives in broker.registration: one pipeline for one or many)

__all__ = [
    "RegistrationResult",
    "api_key_create",
    "institution_create",
    "institution_update",
    "manifest_deprecate",
    "manifest_read_record",
    "manifest_register",
    "manifest_rejection_audit",
    "manifests_register",
]


def manifest_read_record(
    *, manifest: Manifest, actor: Actor, now: datetime, document: bool = False
) -> None:
    """Audit that someone read a manifest's metadata (or the KOS document itself)."""
    with transaction.atomic():
        audit_record(
            code=EventCode.MANIFEST_READ,
            actor=actor,
            now=now,
            patient=patient_ref(manifest.source_identifier.patient),
            objects=[{"type": "study", "uid": manifest.study_instance_uid}],
            details={"manifest": manifest.sop_instance_uid, "document": document},
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
