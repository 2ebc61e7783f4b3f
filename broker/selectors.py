"""Registry reads: patients by any identifier, manifests with filters and keyset pagination."""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import date

from django.db.models import Exists, OuterRef, Q, QuerySet

from broker.dicom.kos import (
    INS_NIA_OID,
    INS_NIA_TEST_OID,
    INS_NIR_OID,
    INS_NIR_TEST_OID,
    KOSError,
    normalise_ins_matricule,
)
from broker.errors import InvalidInput
from broker.models import (
    STUDY_DATE_SORT,
    UNDATED,
    Institution,
    Manifest,
    ManifestSeries,
    ManifestStatus,
    Patient,
    PatientIdentifier,
)

INS_OIDS = frozenset({INS_NIR_OID, INS_NIA_OID, INS_NIR_TEST_OID, INS_NIA_TEST_OID})


def patient_by_identifier(*, issuer: str, value: str) -> Patient | None:
    """The regional patient behind any of their identifiers (a local IPP or the INS).

    An INS may be given with or without its 2-digit key, with spaces: it is normalised.
    """
    if issuer in INS_OIDS:
        try:
            value = normalise_ins_matricule(value)
        except KOSError:
            return None
    identifier = (
        PatientIdentifier.objects.filter(issuer=issuer, value=value)
        .select_related("patient")
        .first()
    )
    return identifier.patient if identifier else None


def patient_identifiers(*, patient: Patient) -> QuerySet[PatientIdentifier]:
    return patient.identifiers.select_related("institution").order_by("kind", "issuer", "value")


@dataclass(frozen=True)
class ManifestFilters:
    patient: Patient | None = None
    date_from: date | None = None
    date_to: date | None = None
    modality: str | None = None
    institution: Institution | None = None
    status: str | None = ManifestStatus.APPROVED
    study_instance_uid: str | None = None


@dataclass(frozen=True)
class ManifestPage:
    items: list[Manifest]
    next_cursor: str | None


def _encode_cursor(manifest: Manifest) -> str:
    key = [(manifest.study_date or UNDATED).isoformat(), manifest.id]
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[date, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        day, last_id = json.loads(raw)
        last_id = int(last_id)
        if not 0 < last_id < 2**63:
            raise ValueError("id out of range")
        return date.fromisoformat(day), last_id
    except (binascii.Error, ValueError, TypeError, OverflowError, json.JSONDecodeError) as exc:
        raise InvalidInput(
            "The cursor is not one this API gave", code="relais:cursor:invalid"
        ) from exc


def manifests_filter(*, scope: QuerySet[Manifest], filters: ManifestFilters) -> QuerySet[Manifest]:
    """Apply filters to a scope of manifests the caller may see (from an access gate)."""
    queryset = scope
    if filters.patient is not None:
        queryset = queryset.filter(source_identifier__patient=filters.patient)
    if filters.status:
        queryset = queryset.filter(status=filters.status)
    if filters.date_from:
        queryset = queryset.filter(study_date__gte=filters.date_from)
    if filters.date_to:
        queryset = queryset.filter(study_date__lte=filters.date_to)
    if filters.institution is not None:
        queryset = queryset.filter(source_institution=filters.institution)
    if filters.study_instance_uid:
        queryset = queryset.filter(
            Exists(
                ManifestSeries.objects.filter(
                    manifest=OuterRef("pk"), study_instance_uid=filters.study_instance_uid
                )
            )
        )
    if filters.modality:
        queryset = queryset.filter(
            Exists(
                ManifestSeries.objects.filter(manifest=OuterRef("pk"), modality=filters.modality)
            )
        )
    return queryset


def manifest_page(
    *, scope: QuerySet[Manifest], filters: ManifestFilters, cursor: str | None, limit: int
) -> ManifestPage:
    """One page of manifests, newest study first (study date descending, undated last).

    Keyset pagination on (study_date, id): each page costs the same, however deep.
    """
    queryset = (
        manifests_filter(scope=scope, filters=filters)
        .defer("kos_bytes")
        .annotate(sort_date=STUDY_DATE_SORT)
    )
    if cursor:
        day, last_id = _decode_cursor(cursor)
        queryset = queryset.filter(Q(sort_date__lt=day) | Q(sort_date=day, id__lt=last_id))
    items = list(
        queryset.select_related("source_institution", "source_identifier").order_by(
            "-sort_date", "-id"
        )[: limit + 1]
    )
    next_cursor = _encode_cursor(items[limit - 1]) if len(items) > limit else None
    return ManifestPage(items=items[:limit], next_cursor=next_cursor)


def manifest_series(*, manifest: Manifest) -> QuerySet[ManifestSeries]:
    return manifest.series.order_by("study_instance_uid", "id")


def approved_manifest_count() -> int:
    return Manifest.objects.filter(status=ManifestStatus.APPROVED).count()
