"""Registering KOS manifests: one document (the REST API) or a batch (imports, harvests).

Both go through :func:`manifests_register`: documents are parsed and validated outside
the transaction, then one transaction registers the batch with set-based queries and
appends its audit events to the chain in one go. Semantics are those of registering the
documents one after the other, in order:

- the same KOS twice (same SOP Instance UID, same bytes) changes nothing: ``unchanged``;
- the same SOP Instance UID with other bytes is refused (409);
- a manifest for a study that already has an approved manifest from the same source
  replaces it: the old one is deprecated and points to the new one (``replaced_by``);
- anything refused is audited (``registry:manifest:reject``) and stores nothing else.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from django.conf import settings
from django.db import IntegrityError, OperationalError, connection, transaction

from audit.events import EventCode, Outcome
from audit.services import Actor, AuditEntry, PatientRef, audit_record_many
from broker.bulk import bulk_insert, copy_rows
from broker.dicom.kos import (
    KOSError,
    ParsedKOS,
    ResolvedPatientId,
    national_ids,
    parse_kos,
    resolve_patient_id,
)
from broker.errors import Conflict, DomainError, UnprocessableManifest
from broker.identity import identities_create, identity_resolve_for_manifest, patient_refs
from broker.models import (
    IdentifierKind,
    Institution,
    Manifest,
    ManifestInstance,
    ManifestSeries,
    ManifestStatus,
    PatientIdentifier,
)

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

Outcome_ = Literal["new", "unchanged", "replaced", "rejected"]


@dataclass(frozen=True)
class RegistrationResult:
    outcome: Outcome_
    manifest: Manifest | None = None
    replaced: tuple[Manifest, ...] = ()
    error: DomainError | None = None


@dataclass(eq=False)
class _Approved:
    """The approved manifest of a study: registered already, or earlier in this batch."""

    identifier_id: int
    manifest: Manifest | None = None
    document: _Document | None = None
    studies: set[str] = field(default_factory=set)

    def current(self) -> Manifest:
        manifest = self.manifest if self.manifest is not None else self.document.manifest  # type: ignore[union-attr]
        assert manifest is not None
        return manifest


@dataclass(eq=False)
class _Document:
    """One document of a batch, as it goes through the pipeline."""

    data: bytes
    sha256: str
    kos: ParsedKOS | None = None
    primary: ResolvedPatientId | None = None
    nationals: tuple[ResolvedPatientId, ...] = ()
    error: DomainError | None = None
    result: RegistrationResult | None = None
    identifier: PatientIdentifier | None = None
    manifest: Manifest | None = None
    replaces: list[_Approved] = field(default_factory=list)
    duplicate_of: _Document | None = None
    created_patient: bool = False
    linked: bool = False
    candidates: tuple[int, ...] = ()


def manifest_register(
    *,
    data: bytes,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
) -> RegistrationResult:
    """Register one manifest; a refusal raises (``UnprocessableManifest``, ``Conflict``)."""
    result = manifests_register(
        documents=[data],
        institution=institution,
        actor=actor,
        now=now,
        correlation_id=correlation_id,
    )[0]
    if result.error is not None:
        raise result.error
    return result


def manifests_register(
    *,
    documents: Sequence[bytes],
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None = None,
    parsed: Sequence[ParsedKOS | None] | None = None,
) -> list[RegistrationResult]:
    """Register a batch of manifests published by ``institution``: one result per document.

    ``parsed``: what `parse_kos` gave for each document, when the caller has it (a harvest
    builds its manifests with `kos.build_kos_parsed`; the DIMSE intake keeps the parse of
    `manifest_check` with the bytes it queues); they are not parsed again, a None is. The
    caller vouches that each is the parse of its document's bytes: only the broker's own
    parse or build of those very bytes, never a parse that came from outside."""
    correlation_id = correlation_id or uuid.uuid4()
    if parsed is not None and len(parsed) != len(documents):
        raise ValueError("one parsed manifest per document")
    batch = [
        _prepare(data, institution, parsed[index] if parsed is not None else None)
        for index, data in enumerate(documents)
    ]
    # A concurrent writer may take a unique key first (PostgreSQL: same new patient, same
    # manifest); the batch then runs again and sees the other one's rows.
    for attempt in range(3):
        try:
            with transaction.atomic():
                _register_batch(batch, institution, actor, now, correlation_id)
            break
        except (IntegrityError, OperationalError) as exc:
            if attempt == 2 or not _retryable(exc):
                raise
            for document in batch:
                _reset(document)
    return [document.result for document in batch if document.result is not None]


def manifest_check(
    *, data: bytes, institution: Institution
) -> tuple[ParsedKOS | None, DomainError | None]:
    """What registration would refuse on the document's face, without the database:
    (its parse or None, the refusal or None). Registry conflicts (a UID reused, a study of
    another patient) are found only when it is registered. The parse may be kept with the
    bytes and given to `manifests_register` (``parsed``)."""
    document = _prepare(data, institution)
    return document.kos, document.error


def _retryable(exc: Exception) -> bool:
    """A unique key taken by a concurrent writer, a deadlock or a serialization failure."""
    if isinstance(exc, IntegrityError):
        return True
    sqlstate = getattr(getattr(exc, "__cause__", None), "sqlstate", None)
    return sqlstate in {"40P01", "40001"}


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
    """Record a publication refused before its body could be read (own transaction)."""
    with transaction.atomic():
        audit_record_many(
            [
                _rejection_entry(
                    code, message, _sha256(data), len(data), institution, actor, now, correlation_id
                )
            ]
        )


# ---------------------------------------------------------------------------
# Outside the transaction: parse and validate


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _prepare(data: bytes, institution: Institution, kos: ParsedKOS | None = None) -> _Document:
    document = _Document(data=data, sha256=_sha256(data))
    try:
        if not institution.active:
            raise Conflict(
                f"Institution {institution.finess} is not active: it cannot publish",
                code="registry:institution:inactive",
            )
        limit = settings.RELAIS_MAX_MANIFEST_BYTES
        if len(data) > limit:
            raise KOSError("kos:too-large", f"The manifest is larger than {limit} bytes")
        if kos is None:
            kos = parse_kos(data)
        _check_lengths(kos)
        document.primary = resolve_patient_id(
            kos,
            institution_issuer=institution.patient_id_issuer,
            institution_issuer_oid=institution.patient_id_issuer_oid or None,
        )
        document.nationals = national_ids(kos)
        document.kos = kos
    except KOSError as exc:
        document.error = UnprocessableManifest(exc.message, code=exc.code)
    except DomainError as exc:
        document.error = exc
    return document


def _reset(document: _Document) -> None:
    document.result = None
    document.identifier = None
    document.manifest = None
    document.replaces = []
    document.duplicate_of = None
    document.created_patient = document.linked = False
    document.candidates = ()
    if document.kos is not None:
        document.error = None


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


# ---------------------------------------------------------------------------
# Inside the transaction


def _register_batch(
    batch: list[_Document],
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
) -> None:
    # One registering transaction per source at a time: replacement reads the source's
    # approved manifests, and "one approved manifest per study" must hold for every study a
    # KOS references, which no single unique index can say for multi-study manifests.
    # FOR NO KEY UPDATE: it serialises registrations, yet lets rows that merely reference
    # the institution (its received manifests, queued meanwhile) be inserted.
    Institution.objects.select_for_update(no_key=True).filter(pk=institution.pk).values_list(
        "pk"
    ).first()
    valid = [d for d in batch if d.error is None and d.kos is not None]
    _check_existing(valid, institution)
    valid = [d for d in valid if d.error is None and d.result is None and d.duplicate_of is None]
    entries: list[AuditEntry] = []
    _resolve_identities_and_replacements(valid, institution, actor, now, correlation_id, entries)
    valid = [d for d in valid if d.error is None]
    _insert_manifests(valid, institution, now)

    refs = patient_refs([d.identifier.id for d in valid if d.identifier is not None])
    for document in batch:
        if document.duplicate_of is not None:
            original = document.duplicate_of
            if original.error is not None:
                document.error = original.error
            else:
                document.result = RegistrationResult(
                    outcome="unchanged", manifest=original.manifest
                )
                continue
        if document.error is not None:
            document.result = RegistrationResult(outcome="rejected", error=document.error)
            entries.append(
                _rejection_entry(
                    document.error.code,
                    document.error.detail,
                    document.sha256,
                    len(document.data),
                    institution,
                    actor,
                    now,
                    correlation_id,
                )
            )
        elif document.result is None:
            assert document.manifest is not None
            assert document.identifier is not None
            document.result = RegistrationResult(
                outcome="replaced" if document.replaces else "new",
                manifest=document.manifest,
                replaced=tuple(old.current() for old in document.replaces),
            )
            entries.append(
                _registration_entry(
                    document, refs[document.identifier.id], institution, actor, now, correlation_id
                )
            )
    audit_record_many(entries)


def _check_existing(batch: list[_Document], institution: Institution) -> None:
    """Same SOP Instance UID: same bytes -> unchanged; other bytes -> refused."""
    uids = [d.kos.sop_instance_uid for d in batch if d.kos is not None]
    existing = {
        m.sop_instance_uid: m
        for m in Manifest.objects.select_for_update()
        .filter(sop_instance_uid__in=uids)
        .defer("kos_bytes")
        .order_by("id")
    }
    first_in_batch: dict[str, _Document] = {}
    for document in batch:
        assert document.kos is not None
        uid = document.kos.sop_instance_uid
        previous = existing.get(uid)
        earlier = first_in_batch.get(uid)
        if previous is not None:
            same = (
                previous.kos_sha256 == document.sha256
                and previous.source_institution_id == institution.id
            )
        elif earlier is not None:
            same = earlier.sha256 == document.sha256
        else:
            first_in_batch[uid] = document
            continue
        if same and previous is not None:
            document.result = RegistrationResult(outcome="unchanged", manifest=previous)
        elif same:
            document.duplicate_of = earlier
        else:
            document.error = Conflict(
                f"SOP Instance UID {uid} is already registered with other content; "
                "a changed manifest needs a new SOP Instance UID",
                code="registry:manifest:uid-reused",
            )


def _identifier_key(resolved: ResolvedPatientId) -> tuple[str, str]:
    return (resolved.issuer, resolved.value)


def _traits_match(identifier: PatientIdentifier, kos: ParsedKOS) -> bool:
    patient = kos.patient
    return (
        identifier.family_name == patient.family_name[:128]
        and identifier.given_names == patient.given_names[:128]
        and identifier.birth_name == patient.birth_name[:128]
        and identifier.birth_date == patient.birth_date
        and identifier.sex == patient.sex[:1]
    )


def _known_identifiers(keys: set[tuple[str, str]]) -> dict[tuple[str, str], PatientIdentifier]:
    if not keys:
        return {}
    # Both columns, so that the (issuer, value) unique index serves the lookup.
    rows = (
        PatientIdentifier.objects.select_for_update()
        .filter(
            issuer__in={issuer for issuer, _value in keys},
            value__in={value for _issuer, value in keys},
        )
        .order_by("id")
    )
    return {(i.issuer, i.value): i for i in rows if (i.issuer, i.value) in keys}


def _approved_manifests(batch: list[_Document], institution: Institution) -> dict[str, _Approved]:
    """The approved manifest of each study of the batch, from this source, already registered."""
    study_uids = {s.study_instance_uid for d in batch if d.kos for s in d.kos.studies}
    if not study_uids:
        return {}
    # Each query below reads by one key, series by study UID and manifests by primary key, and
    # the source and the status are checked here: joined, or with the source and status in the
    # WHERE clause, PostgreSQL may read the source's every approved manifest when its
    # statistics are older than the registry (a registry filling fast, as at go-live; see
    # benchmarks/registration.py), and the batch's cost then grows with the registry.
    study_manifest_ids = set(
        ManifestSeries.objects.filter(study_instance_uid__in=study_uids).values_list(
            "manifest_id", flat=True
        )
    )
    if not study_manifest_ids:
        return {}
    approved_ids = sorted(
        manifest_id
        for manifest_id, source_id, status in Manifest.objects.filter(
            id__in=study_manifest_ids
        ).values_list("id", "source_institution_id", "status")
        if source_id == institution.pk and status == ManifestStatus.APPROVED
    )
    # Locked in key order, then checked again: a manifest deprecated meanwhile is left out (a
    # manifest is never approved again once deprecated, and never changes source).
    manifests = [
        manifest
        for manifest in Manifest.objects.select_for_update()
        .filter(id__in=approved_ids)
        .defer("kos_bytes")
        .order_by("id")
        if manifest.status == ManifestStatus.APPROVED
    ]
    by_id = {m.id: _Approved(identifier_id=m.source_identifier_id, manifest=m) for m in manifests}
    approved: dict[str, _Approved] = {}
    for manifest_id, study_uid in ManifestSeries.objects.filter(
        manifest_id__in=list(by_id)
    ).values_list("manifest_id", "study_instance_uid"):
        approved[study_uid] = by_id[manifest_id]
        by_id[manifest_id].studies.add(study_uid)
    return approved


def _partial_overlap(olds: list[_Approved], kos: ParsedKOS) -> Conflict | None:
    """A manifest replaces those it covers entirely; one that would leave a study of an
    older manifest without an approved manifest is refused."""
    mine = {s.study_instance_uid for s in kos.studies}
    for old in olds:
        left = sorted(old.studies - mine)
        if left:
            where = (
                f"manifest {old.manifest.sop_instance_uid}"
                if old.manifest is not None
                else "an earlier manifest of this batch"
            )
            return Conflict(
                f"{where} also covers study {left[0]}, which this manifest does not: publish "
                "a manifest of all its studies, or deprecate it first",
                code="registry:manifest:partial-overlap",
            )
    return None


def _mismatch(olds: list[_Approved], identifier: PatientIdentifier) -> Conflict | None:
    """A study already registered by this source for another patient is refused."""
    for old in olds:
        if old.identifier_id == identifier.id:
            continue
        old_patient = (
            PatientIdentifier.objects.filter(id=old.identifier_id)
            .values_list("patient_id", flat=True)
            .first()
        )
        if old_patient != identifier.patient_id:
            where = (
                f"manifest {old.manifest.sop_instance_uid}"
                if old.manifest is not None
                else "an earlier manifest of this batch"
            )
            return Conflict(
                "A study of this manifest is already registered for another patient "
                f"({where}); deprecate it first",
                code="registry:manifest:patient-mismatch",
            )
    return None


def _create_new_patients(
    batch: list[_Document],
    known: dict[tuple[str, str], PatientIdentifier],
    approved: dict[str, _Approved],
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
    identity_events: list[AuditEntry],
) -> None:
    """Local IDs seen for the first time, with no INS to link and no study that could make
    their document refused afterwards, get their patients in bulk (the common case of an
    import: most patients are new). The others go through the identity service one by one."""
    study_uses: dict[str, int] = {}
    for document in batch:
        assert document.kos is not None
        for study in document.kos.studies:
            study_uses[study.study_instance_uid] = study_uses.get(study.study_instance_uid, 0) + 1
    simple: dict[str, _Document] = {}
    for document in batch:
        assert document.kos is not None
        assert document.primary is not None
        key = _identifier_key(document.primary)
        nationals = tuple(n for n in document.nationals if n.qualified)
        if (
            document.primary.kind == "IPP"
            and key not in known
            and all(_identifier_key(n) not in known for n in nationals)
            and all(
                s.study_instance_uid not in approved and study_uses[s.study_instance_uid] == 1
                for s in document.kos.studies
            )
        ):
            simple.setdefault(document.primary.value, document)
    # An INS published with two new local IDs of the batch: leave both to the service.
    ins_owner: dict[tuple[str, str], str] = {}
    for value, document in list(simple.items()):
        for national in document.nationals:
            if not national.qualified:
                continue
            owner = ins_owner.setdefault(_identifier_key(national), value)
            if owner != value:
                simple.pop(value, None)
                simple.pop(owner, None)
    created = identities_create(
        institution=institution,
        people=[
            (value, document.kos.patient, tuple(n for n in document.nationals if n.qualified))  # type: ignore[union-attr]
            for value, document in simple.items()
        ],
        actor=actor,
        correlation_id=correlation_id,
        now=now,
        sink=identity_events,
    )
    for value, (identifier, candidates) in created.items():
        known[(identifier.issuer, identifier.value)] = identifier
        for national in simple[value].nationals:
            if national.qualified:
                known[_identifier_key(national)] = PatientIdentifier(
                    issuer=national.issuer, value=national.value, patient_id=identifier.patient_id
                )
        simple[value].created_patient = True
        simple[value].candidates = tuple(candidate.id for candidate in candidates)


def _resolve_identities_and_replacements(
    batch: list[_Document],
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
    identity_events: list[AuditEntry],
) -> None:
    """The identifier each manifest hangs off, and the manifests it replaces.

    The common case (a patient already known, traits unchanged, INS already linked) costs
    one query for the whole batch; anything else goes through the identity service, in a
    savepoint, so that a document refused afterwards leaves no patient behind.
    """
    approved = _approved_manifests(batch, institution)
    keys = {
        _identifier_key(r)
        for d in batch
        for r in ((d.primary,) if d.primary else ()) + d.nationals
        if r is not None
    }
    known = _known_identifiers(keys)
    _create_new_patients(
        batch, known, approved, institution, actor, now, correlation_id, identity_events
    )
    for document in batch:
        assert document.kos is not None
        assert document.primary is not None
        olds: list[_Approved] = []
        for study in document.kos.studies:
            old = approved.get(study.study_instance_uid)
            if old is not None and old not in olds:
                olds.append(old)
        document.error = _partial_overlap(olds, document.kos)
        if document.error is not None:
            continue
        identifier = known.get(_identifier_key(document.primary))
        fast = (
            identifier is not None
            and (
                identifier.kind != IdentifierKind.IPP or identifier.institution_id == institution.id
            )
            and _traits_match(identifier, document.kos)
            and all(
                (ins := known.get(_identifier_key(n))) is not None
                and ins.patient_id == identifier.patient_id
                for n in document.nationals
                if n.qualified and _identifier_key(n) != _identifier_key(document.primary)
            )
        )
        if fast:
            assert identifier is not None
            document.error = _mismatch(olds, identifier)
            if document.error is not None:
                continue
            document.identifier = identifier
        else:
            # A savepoint only where the document may still be refused after its patient is
            # written (a study already registered): the identity service itself refuses
            # before it writes.
            savepoint = transaction.savepoint() if olds else None
            events: list[AuditEntry] = []
            try:
                resolved = identity_resolve_for_manifest(
                    institution=institution,
                    primary=document.primary,
                    nationals=document.nationals,
                    traits=document.kos.patient,
                    actor=actor,
                    correlation_id=correlation_id,
                    now=now,
                    sink=events,
                )
                document.error = _mismatch(olds, resolved.identifier)
            except Conflict as exc:
                document.error = exc
            if document.error is not None:
                if savepoint is not None:
                    transaction.savepoint_rollback(savepoint)
                continue
            if savepoint is not None:
                transaction.savepoint_commit(savepoint)
            identity_events.extend(events)
            document.identifier = resolved.identifier
            document.created_patient = resolved.created
            document.linked = resolved.linked
            document.candidates = tuple(c.id for c in resolved.candidates)
            # Identifiers may have been created, or moved by a link: read them again.
            if resolved.linked:
                known = _known_identifiers(keys)
            else:
                known[_identifier_key(document.primary)] = resolved.identifier
                known.update(
                    _known_identifiers(
                        {_identifier_key(n) for n in document.nationals if n.qualified}
                    )
                )
        document.replaces = olds
        mine = _Approved(
            identifier_id=document.identifier.id,
            document=document,
            studies={s.study_instance_uid for s in document.kos.studies},
        )
        for study in document.kos.studies:
            approved[study.study_instance_uid] = mine


def _insert_manifests(batch: list[_Document], institution: Institution, now: datetime) -> None:
    if not batch:
        return
    # Deprecate what is replaced first: one approved manifest per study and source.
    replaced_in_db = {old.manifest.id for d in batch for old in d.replaces if old.manifest}
    if replaced_in_db:
        Manifest.objects.filter(id__in=replaced_in_db).update(
            status=ManifestStatus.DEPRECATED, deprecated_at=now
        )
    replaced_in_batch = {id(old.document) for d in batch for old in d.replaces if old.document}
    rows = []
    for document in batch:
        kos = document.kos
        assert kos is not None
        assert document.identifier is not None
        primary_study = kos.studies[0]
        first_series = primary_study.series[0]
        superseded = id(document) in replaced_in_batch
        rows.append(
            Manifest(
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
                source_identifier=document.identifier,
                retrieve_ae_title=first_series.retrieve_ae_title or "",
                retrieve_location_uid=first_series.retrieve_location_uid or "",
                retrieve_url=first_series.retrieve_url or "",
                status=ManifestStatus.DEPRECATED if superseded else ManifestStatus.APPROVED,
                deprecated_at=now if superseded else None,
                kos_bytes=document.data,
                kos_sha256=document.sha256,
                kos_size=len(document.data),
                registered_at=now,
            )
        )
    manifests = bulk_insert(Manifest, rows)
    for document, manifest in zip(batch, manifests, strict=True):
        document.manifest = manifest
    # Point what was replaced to what replaced it.
    for document in batch:
        if document.replaces:
            Manifest.objects.filter(id__in=[old.current().id for old in document.replaces]).update(
                replaced_by=document.manifest
            )
    series_rows = []
    parsed_series = []
    for document in batch:
        assert document.kos is not None
        for study in document.kos.studies:
            for series in study.series:
                parsed_series.append(series)
                series_rows.append(
                    ManifestSeries(
                        manifest=document.manifest,
                        study_instance_uid=study.study_instance_uid,
                        series_instance_uid=series.series_instance_uid,
                        modality=series.modality or "",
                        body_part=series.body_part or "",
                        retrieve_ae_title=series.retrieve_ae_title or "",
                        retrieve_location_uid=series.retrieve_location_uid or "",
                        retrieve_url=series.retrieve_url or "",
                        instance_count=len(series.instances),
                    )
                )
    created_series = bulk_insert(ManifestSeries, series_rows)
    _insert_instances(
        [
            (row.id, instance.sop_instance_uid, instance.sop_class_uid)
            for row, series in zip(created_series, parsed_series, strict=True)
            for instance in series.instances
        ]
    )


def _insert_instances(rows: list[tuple[int, str, str]]) -> None:
    """The referenced instances: the largest table, so inserted without building models.

    A study is hundreds of rows; the ORM's per-object work would cost more than the
    database's. PostgreSQL takes them by COPY (as three arrays, psycopg dumped each element
    in Python).
    """
    if not rows:
        return
    table = ManifestInstance._meta.db_table
    columns = ["series_id", "sop_instance_uid", "sop_class_uid"]
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            copy_rows(cursor, table, columns, rows)
        else:
            cursor.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES (%s, %s, %s)",  # noqa: S608
                rows,
            )


# ---------------------------------------------------------------------------
# Audit entries


def _registration_entry(
    document: _Document,
    patient: PatientRef,
    institution: Institution,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID,
) -> AuditEntry:
    kos = document.kos
    assert kos is not None
    assert document.identifier is not None
    return AuditEntry(
        code=EventCode.MANIFEST_REPLACE if document.replaces else EventCode.MANIFEST_REGISTER,
        actor=actor,
        now=now,
        patient=patient,
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
            "sha256": document.sha256,
            "size": len(document.data),
            "institution": institution.finess,
            "source_patient_id": {
                "issuer": document.identifier.issuer,
                "value": document.identifier.value,
            },
            "replaces": [old.current().sop_instance_uid for old in document.replaces],
            "patient_created": document.created_patient,
            "patient_linked": document.linked,
            "candidates": list(document.candidates),
        },
    )


def _rejection_entry(
    code: str,
    message: str,
    sha256: str,
    size: int,
    institution: Institution | None,
    actor: Actor,
    now: datetime,
    correlation_id: uuid.UUID | None,
) -> AuditEntry:
    return AuditEntry(
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
