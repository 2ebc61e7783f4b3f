"""Patient identity: local identifiers cross-referenced into regional patients (PIX-like).

Rules:
- A local ID (issuer + value) belongs to exactly one regional patient at a time.
- A *qualified* INS published beside a local ID links that local ID to every other
  local ID published with the same INS (they become one regional patient).
- A demographic match without INS never links: it creates a candidate for a person.
- Link and unlink move identifiers between patients; every move is kept in
  ``IdentifierLinkHistory`` and audited. Manifests hang off identifiers, so no move
  ever loses one.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import transaction

from audit.events import EventCode
from audit.services import Actor, AuditEntry, PatientRef, audit_record
from broker.bulk import bulk_insert
from broker.dicom.kos import PatientInfo, ResolvedPatientId
from broker.errors import Conflict, InvalidInput
from broker.models import (
    IdentifierKind,
    IdentifierLinkHistory,
    Institution,
    LinkCandidate,
    Patient,
    PatientIdentifier,
)


def patient_ref(patient: Patient) -> PatientRef:
    """The patient as the audit trail names it: regional ID and every current identifier."""
    identifiers = tuple(
        {"issuer": issuer, "value": value, "kind": kind}
        for issuer, value, kind in patient.identifiers.order_by("id").values_list(
            "issuer", "value", "kind"
        )
    )
    return PatientRef(patient_id=str(patient.public_id), identifiers=identifiers)


AuditSink = list[AuditEntry] | None


def _emit(sink: AuditSink, **entry: Any) -> None:
    """Write an audit event now, or add it to the caller's batch (``sink``)."""
    if sink is None:
        audit_record(**entry)
    else:
        sink.append(AuditEntry(**entry))


def patient_refs(identifier_ids: Iterable[int]) -> dict[int, PatientRef]:
    """The audit trail's view of the patients behind these identifiers, in two queries."""
    patient_of = dict(
        PatientIdentifier.objects.filter(id__in=set(identifier_ids)).values_list("id", "patient_id")
    )
    identifiers: dict[int, list[dict[str, str]]] = {}
    public: dict[int, str] = {}
    rows = (
        PatientIdentifier.objects.filter(patient_id__in=set(patient_of.values()))
        .order_by("id")
        .values_list("patient_id", "patient__public_id", "issuer", "value", "kind")
    )
    for patient_id, public_id, issuer, value, kind in rows:
        public[patient_id] = str(public_id)
        identifiers.setdefault(patient_id, []).append(
            {"issuer": issuer, "value": value, "kind": kind}
        )
    return {
        identifier_id: PatientRef(
            patient_id=public[patient_id], identifiers=tuple(identifiers[patient_id])
        )
        for identifier_id, patient_id in patient_of.items()
    }


def _normalise(text: str) -> str:
    """Upper case, accents and punctuation folded: how traits are compared for candidates."""
    decomposed = unicodedata.normalize("NFKD", text)
    letters = "".join(c for c in decomposed if not unicodedata.combining(c))
    return " ".join("".join(c if c.isalnum() else " " for c in letters.upper()).split())


def _first_given_name(given_names: str) -> str:
    normalised = _normalise(given_names)
    return normalised.split(" ")[0] if normalised else ""


def _ins_kind(resolved: ResolvedPatientId) -> str:
    return {"INS-NIR": IdentifierKind.INS_NIR, "INS-NIA": IdentifierKind.INS_NIA}.get(
        resolved.kind, IdentifierKind.IPP
    )


@dataclass(frozen=True)
class ResolvedIdentity:
    identifier: PatientIdentifier
    created: bool
    linked: bool
    candidates: tuple[LinkCandidate, ...]


def _move_identifiers(
    *,
    identifiers: Iterable[PatientIdentifier],
    to_patient: Patient,
    reason: str,
    actor: Actor,
    comment: str,
    correlation_id: uuid.UUID,
    now: datetime,
) -> list[PatientIdentifier]:
    moved = []
    for identifier in identifiers:
        if identifier.patient_id == to_patient.id:
            continue
        IdentifierLinkHistory.objects.create(
            identifier=identifier,
            from_patient_id=identifier.patient_id,
            to_patient=to_patient,
            reason=reason,
            actor=actor.username,
            comment=comment,
            correlation_id=correlation_id,
            at=now,
        )
        identifier.patient = to_patient
        identifier.updated_at = now
        identifier.save(update_fields=["patient", "updated_at"])
        moved.append(identifier)
    return moved


def _creation_history(
    identifier: PatientIdentifier, *, actor: Actor, correlation_id: uuid.UUID, now: datetime
) -> IdentifierLinkHistory:
    """The first line of an identifier's history (unsaved: saved alone or in bulk)."""
    return IdentifierLinkHistory(
        identifier=identifier,
        from_patient=None,
        to_patient_id=identifier.patient_id,
        reason=IdentifierLinkHistory.Reason.CREATED,
        actor=actor.username,
        correlation_id=correlation_id,
        at=now,
    )


def _new_patient(
    *,
    identifier_kwargs: dict[str, object],
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink = None,
) -> PatientIdentifier:
    patient = Patient.objects.create(created_at=now)
    identifier = PatientIdentifier.objects.create(
        patient=patient, created_at=now, updated_at=now, **identifier_kwargs
    )
    _creation_history(identifier, actor=actor, correlation_id=correlation_id, now=now).save()
    _emit(
        sink,
        code=EventCode.PATIENT_CREATE,
        actor=actor,
        now=now,
        patient=PatientRef(
            patient_id=str(patient.public_id),
            identifiers=(
                {"issuer": identifier.issuer, "value": identifier.value, "kind": identifier.kind},
            ),
        ),
        correlation_id=correlation_id,
        details={"identifier": {"issuer": identifier.issuer, "value": identifier.value}},
    )
    return identifier


def _traits(info: PatientInfo) -> dict[str, object]:
    return {
        "family_name": info.family_name[:128],
        "given_names": info.given_names[:128],
        "birth_name": info.birth_name[:128],
        "birth_date": info.birth_date,
        "sex": info.sex[:1],
        "family_key": _normalise(info.family_name)[:128],
        "birth_name_key": _normalise(info.birth_name)[:128],
        "given_key": _first_given_name(info.given_names)[:128],
    }


def identity_resolve_for_manifest(
    *,
    institution: Institution,
    primary: ResolvedPatientId,
    nationals: tuple[ResolvedPatientId, ...],
    traits: PatientInfo,
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink = None,
) -> ResolvedIdentity:
    """The identifier a manifest is published under, created, linked or flagged as needed.

    Must run inside the registering transaction. Audit events go to ``sink`` when given
    (a batch appends them to the chain together), else are written at once.
    """
    kind = IdentifierKind.IPP if primary.kind == "IPP" else _ins_kind(primary)
    identifier = (
        PatientIdentifier.objects.select_for_update()
        .filter(issuer=primary.issuer, value=primary.value)
        .first()
    )
    created = identifier is None
    if identifier is None:
        identifier = _new_patient(
            identifier_kwargs={
                "issuer": primary.issuer,
                "value": primary.value,
                "kind": kind,
                "institution": institution if kind == IdentifierKind.IPP else None,
                "qualified": primary.qualified if kind != IdentifierKind.IPP else False,
                "test": primary.test,
                **_traits(traits),
            },
            actor=actor,
            correlation_id=correlation_id,
            now=now,
            sink=sink,
        )
    else:
        if kind == IdentifierKind.IPP and identifier.institution_id != institution.id:
            raise Conflict(
                f"Patient ID {primary.value} of issuer {primary.issuer} belongs to another "
                "institution's domain",
                code="identity:identifier:foreign-domain",
            )
        new_traits = _traits(traits)
        changed = sorted(k for k, v in new_traits.items() if getattr(identifier, k) != v)
        if changed:
            for key, value in new_traits.items():
                setattr(identifier, key, value)
            identifier.updated_at = now
            identifier.save(update_fields=[*new_traits.keys(), "updated_at"])
            _emit(
                sink,
                code=EventCode.IDENTIFIER_TRAITS,
                actor=actor,
                now=now,
                patient=patient_ref(identifier.patient),
                correlation_id=correlation_id,
                details={
                    "identifier": {"issuer": identifier.issuer, "value": identifier.value},
                    "changed": [k for k in changed if not k.endswith("_key")],
                },
            )

    linked = False
    candidates: list[LinkCandidate] = []
    for national in nationals:
        if national.issuer == identifier.issuer and national.value == identifier.value:
            continue
        if not national.qualified:
            continue
        ins = (
            PatientIdentifier.objects.select_for_update()
            .filter(issuer=national.issuer, value=national.value)
            .first()
        )
        if ins is None:
            ins = PatientIdentifier.objects.create(
                patient_id=identifier.patient_id,
                issuer=national.issuer,
                value=national.value,
                kind=_ins_kind(national),
                qualified=True,
                test=national.test,
                created_at=now,
                updated_at=now,
                **_traits(traits),
            )
            _creation_history(ins, actor=actor, correlation_id=correlation_id, now=now).save()
            _emit(
                sink,
                code=EventCode.IDENTIFIER_ADD,
                actor=actor,
                now=now,
                patient=patient_ref(identifier.patient),
                correlation_id=correlation_id,
                details={"identifier": {"issuer": ins.issuer, "value": ins.value}},
            )
            continue
        if ins.patient_id == identifier.patient_id:
            continue
        if _link_needs_review(identifier.patient_id, ins):
            candidates.extend(
                _candidate_create(
                    a=identifier,
                    b=ins,
                    matched_on=["ins"],
                    actor=actor,
                    correlation_id=correlation_id,
                    now=now,
                    sink=sink,
                )
            )
            continue
        # Same qualified INS: the local ID's patient joins the INS's patient.
        source_patient_id = identifier.patient_id
        moved = _move_identifiers(
            identifiers=PatientIdentifier.objects.select_for_update()
            .filter(patient_id=source_patient_id)
            .order_by("id"),
            to_patient=ins.patient,
            reason=IdentifierLinkHistory.Reason.INS_MATCH,
            actor=actor,
            comment=f"qualified INS {national.value} ({national.issuer})",
            correlation_id=correlation_id,
            now=now,
        )
        identifier.refresh_from_db()
        linked = True
        _emit(
            sink,
            code=EventCode.PATIENT_LINK,
            actor=actor,
            now=now,
            patient=patient_ref(ins.patient),
            correlation_id=correlation_id,
            details={
                "reason": "ins_match",
                "ins": {"issuer": national.issuer, "value": national.value},
                "moved": [{"issuer": m.issuer, "value": m.value} for m in moved],
                "from_patient": str(Patient.objects.get(id=source_patient_id).public_id),
            },
        )

    if created and not linked and kind == IdentifierKind.IPP:
        candidates.extend(
            _demographic_candidates(
                identifier=identifier,
                actor=actor,
                correlation_id=correlation_id,
                now=now,
                sink=sink,
            )
        )
    return ResolvedIdentity(
        identifier=identifier, created=created, linked=linked, candidates=tuple(candidates)
    )


def _link_needs_review(patient_id: int, ins: PatientIdentifier) -> bool:
    """A shared INS links automatically unless a person must look first: an identifier of
    either patient was unlinked by hand, or the local patient already holds another INS
    of the same kind (two national identities must not be merged silently)."""
    involved = PatientIdentifier.objects.filter(patient_id__in=[patient_id, ins.patient_id])
    if involved.filter(auto_link_blocked=True).exists():
        return True
    return (
        PatientIdentifier.objects.filter(patient_id=patient_id, kind=ins.kind)
        .exclude(pk=ins.pk)
        .exists()
    )


def _candidate_create(
    *,
    a: PatientIdentifier,
    b: PatientIdentifier,
    matched_on: list[str],
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink = None,
) -> list[LinkCandidate]:
    first, second = (a, b) if a.id < b.id else (b, a)
    candidate, created = LinkCandidate.objects.get_or_create(
        identifier_a=first,
        identifier_b=second,
        defaults={"matched_on": matched_on, "created_at": now},
    )
    if not created:
        return []
    _emit(
        sink,
        code=EventCode.PATIENT_CANDIDATE,
        actor=actor,
        now=now,
        patient=patient_ref(a.patient),
        correlation_id=correlation_id,
        details={
            "candidate": candidate.id,
            "matched_on": matched_on,
            "a": {"issuer": first.issuer, "value": first.value},
            "b": {"issuer": second.issuer, "value": second.value},
        },
    )
    return [candidate]


def _demographic_candidates(
    *,
    identifier: PatientIdentifier,
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink = None,
) -> list[LinkCandidate]:
    """Local IDs of other institutions whose traits match: candidates only, never links."""
    if not (identifier.family_key and identifier.birth_date and identifier.given_key):
        return []
    others = (
        PatientIdentifier.objects.filter(
            kind=IdentifierKind.IPP,
            birth_date=identifier.birth_date,
            given_key=identifier.given_key,
        )
        .exclude(institution_id=identifier.institution_id)
        .order_by("id")
    )
    return _propose_candidates(
        identifier=identifier,
        others=others,
        actor=actor,
        correlation_id=correlation_id,
        now=now,
        sink=sink,
    )


def _propose_candidates(
    *,
    identifier: PatientIdentifier,
    others: Iterable[PatientIdentifier],
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink,
) -> list[LinkCandidate]:
    """Candidate links from ``identifier`` to those of ``others`` whose traits match."""
    found: list[LinkCandidate] = []
    for other in others:
        if _traits_match_for_candidate(identifier, other):
            found.extend(
                _candidate_create(
                    a=identifier,
                    b=other,
                    matched_on=["family_name", "given_name", "birth_date", "sex"],
                    actor=actor,
                    correlation_id=correlation_id,
                    now=now,
                    sink=sink,
                )
            )
    return found


def identities_create(
    *,
    institution: Institution,
    people: list[tuple[str, PatientInfo, tuple[ResolvedPatientId, ...]]],
    actor: Actor,
    correlation_id: uuid.UUID,
    now: datetime,
    sink: AuditSink = None,
) -> dict[str, tuple[PatientIdentifier, list[LinkCandidate]]]:
    """New regional patients for local IDs of ``institution`` never seen before, in bulk.

    ``people`` are (local ID, traits, qualified INS) triples, each ID and INS once and
    unknown to the registry (the caller has checked, holding a registration batch). Same
    rules as one by one: each gets a patient (with its INS), its creation history and audit
    event, and candidate links to matching identifiers of other institutions (searched with
    one query for all). Returns, per local ID, the new
    identifier and its candidates.
    """
    if not people:
        return {}
    patients = bulk_insert(Patient, [Patient(created_at=now) for _ in people])
    identifiers = bulk_insert(
        PatientIdentifier,
        [
            PatientIdentifier(
                patient=patient,
                issuer=institution.patient_id_issuer,
                value=value,
                kind=IdentifierKind.IPP,
                institution=institution,
                created_at=now,
                updated_at=now,
                **_traits(traits),
            )
            for patient, (value, traits, _ins) in zip(patients, people, strict=True)
        ],
    )
    national_rows = bulk_insert(
        PatientIdentifier,
        [
            PatientIdentifier(
                patient=patient,
                issuer=ins.issuer,
                value=ins.value,
                kind=_ins_kind(ins),
                qualified=True,
                test=ins.test,
                created_at=now,
                updated_at=now,
                **_traits(traits),
            )
            for patient, (_value, traits, nationals) in zip(patients, people, strict=True)
            for ins in nationals
        ],
    )
    bulk_insert(
        IdentifierLinkHistory,
        [
            _creation_history(identifier, actor=actor, correlation_id=correlation_id, now=now)
            for identifier in [*identifiers, *national_rows]
        ],
    )
    nationals_of: dict[int, list[PatientIdentifier]] = {}
    for row in national_rows:
        nationals_of.setdefault(row.patient_id, []).append(row)
    for identifier in identifiers:
        _emit(
            sink,
            code=EventCode.PATIENT_CREATE,
            actor=actor,
            now=now,
            patient=PatientRef(
                patient_id=str(identifier.patient.public_id),
                identifiers=tuple(
                    {"issuer": i.issuer, "value": i.value, "kind": i.kind}
                    for i in [identifier, *nationals_of.get(identifier.patient_id, [])]
                ),
            ),
            correlation_id=correlation_id,
            details={"identifier": {"issuer": identifier.issuer, "value": identifier.value}},
        )
    searchable = [i for i in identifiers if i.family_key and i.birth_date and i.given_key]
    others: list[PatientIdentifier] = []
    if searchable:
        others = list(
            PatientIdentifier.objects.filter(
                kind=IdentifierKind.IPP,
                birth_date__in={i.birth_date for i in searchable},
                given_key__in={i.given_key for i in searchable},
            )
            .exclude(institution_id=institution.id)
            .order_by("id")
        )
    return {
        identifier.value: (
            identifier,
            _propose_candidates(
                identifier=identifier,
                others=others,
                actor=actor,
                correlation_id=correlation_id,
                now=now,
                sink=sink,
            ),
        )
        for identifier in identifiers
    }


def _traits_match_for_candidate(identifier: PatientIdentifier, other: PatientIdentifier) -> bool:
    """Same first given name and birth date, a shared family or birth name, compatible
    sex, another patient of another institution."""
    names = {identifier.family_key, identifier.birth_name_key} - {""}
    return (
        other.birth_date == identifier.birth_date
        and other.given_key == identifier.given_key
        and bool({other.family_key, other.birth_name_key} & names)
        and other.sex in {identifier.sex, "", "O"}
        and other.patient_id != identifier.patient_id
        and other.institution_id != identifier.institution_id
    )


def patient_link(
    *,
    identifier: PatientIdentifier,
    to_patient: Patient,
    actor: Actor,
    now: datetime,
    comment: str = "",
    reason: str = IdentifierLinkHistory.Reason.MANUAL_LINK,
    correlation_id: uuid.UUID | None = None,
) -> Patient:
    """Merge the patient holding ``identifier`` into ``to_patient`` (all its identifiers move)."""
    correlation_id = correlation_id or uuid.uuid4()
    with transaction.atomic():
        identifier = PatientIdentifier.objects.select_for_update().get(pk=identifier.pk)
        if identifier.patient_id == to_patient.id:
            raise Conflict(
                "These identifiers already belong to the same patient",
                code="identity:patient:already-linked",
            )
        source_patient = identifier.patient
        moved = _move_identifiers(
            identifiers=PatientIdentifier.objects.select_for_update()
            .filter(patient=source_patient)
            .order_by("id"),
            to_patient=to_patient,
            reason=reason,
            actor=actor,
            comment=comment,
            correlation_id=correlation_id,
            now=now,
        )
        PatientIdentifier.objects.filter(id__in=[m.id for m in moved]).update(
            auto_link_blocked=False
        )
        audit_record(
            code=EventCode.PATIENT_LINK,
            actor=actor,
            now=now,
            patient=patient_ref(to_patient),
            correlation_id=correlation_id,
            details={
                "reason": reason,
                "comment": comment,
                "from_patient": str(source_patient.public_id),
                "moved": [{"issuer": m.issuer, "value": m.value} for m in moved],
            },
        )
    return to_patient


def patient_unlink(
    *,
    identifier: PatientIdentifier,
    actor: Actor,
    now: datetime,
    comment: str,
    correlation_id: uuid.UUID | None = None,
) -> Patient:
    """Detach one identifier (and its manifests) into a new regional patient.

    The identifier will no longer be linked automatically by a shared INS: a later
    manifest carrying that INS only creates a candidate for review.
    """
    if not comment.strip():
        raise InvalidInput("An unlink needs a reason", code="identity:unlink:no-reason")
    correlation_id = correlation_id or uuid.uuid4()
    with transaction.atomic():
        identifier = PatientIdentifier.objects.select_for_update().get(pk=identifier.pk)
        previous = identifier.patient
        if len(previous.identifiers.select_for_update().order_by("id")) < 2:
            raise Conflict(
                "This identifier is the patient's only one: nothing to unlink",
                code="identity:unlink:sole-identifier",
            )
        new_patient = Patient.objects.create(created_at=now)
        _move_identifiers(
            identifiers=[identifier],
            to_patient=new_patient,
            reason=IdentifierLinkHistory.Reason.UNLINK,
            actor=actor,
            comment=comment,
            correlation_id=correlation_id,
            now=now,
        )
        identifier.auto_link_blocked = True
        identifier.save(update_fields=["auto_link_blocked"])
        for ref in (patient_ref(previous), patient_ref(new_patient)):
            audit_record(
                code=EventCode.PATIENT_UNLINK,
                actor=actor,
                now=now,
                patient=ref,
                correlation_id=correlation_id,
                details={
                    "identifier": {"issuer": identifier.issuer, "value": identifier.value},
                    "from_patient": str(previous.public_id),
                    "to_patient": str(new_patient.public_id),
                    "comment": comment,
                },
            )
    return new_patient


def candidate_decide(
    *, candidate: LinkCandidate, confirm: bool, actor: Actor, now: datetime, comment: str = ""
) -> LinkCandidate:
    """Confirm (link the two patients) or reject a candidate link."""
    correlation_id = uuid.uuid4()
    with transaction.atomic():
        candidate = LinkCandidate.objects.select_for_update().get(pk=candidate.pk)
        if candidate.status != LinkCandidate.Status.PENDING:
            raise Conflict(
                f"This candidate was already {candidate.status}", code="identity:candidate:decided"
            )
        candidate.status = (
            LinkCandidate.Status.CONFIRMED if confirm else LinkCandidate.Status.REJECTED
        )
        candidate.decided_at = now
        candidate.decided_by = actor.username
        candidate.save(update_fields=["status", "decided_at", "decided_by"])
        a, b = candidate.identifier_a, candidate.identifier_b
        if confirm and a.patient_id != b.patient_id:
            patient_link(
                identifier=b,
                to_patient=a.patient,
                actor=actor,
                now=now,
                comment=comment,
                reason=IdentifierLinkHistory.Reason.CANDIDATE_CONFIRMED,
                correlation_id=correlation_id,
            )
        audit_record(
            code=(
                EventCode.PATIENT_CANDIDATE_CONFIRM
                if confirm
                else EventCode.PATIENT_CANDIDATE_REJECT
            ),
            actor=actor,
            now=now,
            patient=patient_ref(PatientIdentifier.objects.get(pk=a.pk).patient),
            correlation_id=correlation_id,
            details={"candidate": candidate.id, "comment": comment},
        )
    return candidate
