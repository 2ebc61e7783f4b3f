"""Recording and withdrawing patients' directives: one service per change, audited.

Who may record: an admissions clerk or a doctor (a clinical role) of an institution where
the patient is known (an IPP of that institution), on the patient's behalf. The directive
is recorded under that IPP, so it belongs to the regional patient of that identifier.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from django.conf import settings
from django.db import connection, transaction

from audit.events import EventCode
from audit.services import audit_record
from audit.types import Actor
from broker.errors import Conflict, InvalidInput, PermissionDenied
from broker.identity import patient_ref
from broker.models import (
    CLINICAL_ROLES,
    IdentifierKind,
    Institution,
    Manifest,
    Membership,
    Patient,
    PatientIdentifier,
    Professional,
    Role,
)
from consent import policy
from consent.evidence import EvidenceRefused, seal
from consent.models import Directive, DirectiveVersion, Evidence
from consent.selectors import consent_evaluate
from consent.signals import consent_restricted, consent_restricting

RECORDER_ROLES = frozenset({Role.ADMISSIONS_CLERK, *CLINICAL_ROLES})


def directive_record(
    *,
    patient: Patient,
    institution: Institution,
    recorder: Any,
    kind: str,
    scope: str,
    value: str = "",
    purposes: Iterable[str] = (),
    valid_from: dt.datetime | None = None,
    valid_until: dt.datetime | None = None,
    evidence: bytes | None = None,
    note: str = "",
    actor: Actor,
    now: dt.datetime,
) -> DirectiveVersion:
    """Record a new directive of ``patient`` at ``institution`` (its version 1)."""
    identifier = _recording_identifier(patient, institution, recorder)
    values = _checked(
        kind, scope, value.strip(), purposes, valid_from, valid_until, patient=patient
    )
    sealed = _sealed(evidence)
    _require_grounds(evidence, note, widening=kind == policy.DirectiveKind.CONSENT)
    with transaction.atomic():
        _lock_patient(patient)
        directive = Directive.objects.create(identifier=identifier, kind=kind, created_at=now)
        version = DirectiveVersion.objects.create(
            directive=directive,
            version=1,
            **values,
            **_recorded(recorder, institution, now, sealed, note),
        )
        if kind in (policy.DirectiveKind.OPPOSITION, policy.DirectiveKind.MASK):
            _restricted(patient, version, now)
        _audit(EventCode.CONSENT_RECORD, version, patient, actor, now)
    return version


def directive_withdraw(
    *,
    directive: Directive,
    institution: Institution,
    recorder: Any,
    evidence: bytes | None = None,
    note: str = "",
    actor: Actor,
    now: dt.datetime,
) -> DirectiveVersion:
    """Withdraw a directive: a new version, withdrawn, in force at once."""
    patient = directive.identifier.patient
    _recording_identifier(patient, institution, recorder)
    # Withdrawing an opposition or a mask widens sharing: say on what grounds.
    _require_grounds(evidence, note, widening=directive.kind != policy.DirectiveKind.CONSENT)
    sealed = _sealed(evidence)
    with transaction.atomic():
        locked, latest = _current_version(patient, directive, "it is already withdrawn")
        version = DirectiveVersion.objects.create(
            directive=locked,
            version=latest.version + 1,
            scope=latest.scope,
            value=latest.value,
            purposes=latest.purposes,
            valid_from=latest.valid_from,
            valid_until=latest.valid_until,
            withdrawn=True,
            **_recorded(recorder, institution, now, sealed, note),
        )
        if locked.kind == policy.DirectiveKind.CONSENT:
            _restricted(patient, version, now)
        _audit(EventCode.CONSENT_WITHDRAW, version, patient, actor, now)
    return version


def directive_amend(
    *,
    directive: Directive,
    institution: Institution,
    recorder: Any,
    scope: str,
    value: str = "",
    purposes: Iterable[str] = (),
    valid_from: dt.datetime | None = None,
    valid_until: dt.datetime | None = None,
    evidence: bytes | None = None,
    note: str = "",
    actor: Actor,
    now: dt.datetime,
) -> DirectiveVersion:
    """Change a directive (its scope, purposes or dates): a new version, the old ones kept.

    A withdrawn directive is not amended: record a new one.
    """
    patient = directive.identifier.patient
    _recording_identifier(patient, institution, recorder)
    values = _checked(
        directive.kind, scope, value.strip(), purposes, valid_from, valid_until, patient=patient
    )
    _require_grounds(evidence, note, widening=True)
    sealed = _sealed(evidence)
    with transaction.atomic():
        locked, latest = _current_version(patient, directive, "record a new one")
        version = DirectiveVersion.objects.create(
            directive=locked,
            version=latest.version + 1,
            **values,
            **_recorded(recorder, institution, now, sealed, note),
        )
        # Any change may narrow what was allowed: the sharing service re-checks (before the
        # audit: rows are locked before the audit chain's lock, in every service).
        _restricted(patient, version, now)
        _audit(EventCode.CONSENT_AMEND, version, patient, actor, now)
    return version


def _current_version(
    patient: Patient, directive: Directive, advice: str
) -> tuple[Directive, DirectiveVersion]:
    """The directive, locked with its patient, and its latest version, which must not be a
    withdrawal (``advice`` says what to do instead)."""
    _lock_patient(patient)
    locked = Directive.objects.select_for_update().get(pk=directive.pk)
    latest = locked.versions.order_by("-version").first()
    assert latest is not None
    if latest.withdrawn:
        raise Conflict(
            f"Directive {locked.pk} is withdrawn: {advice}",
            code="consent:directive:already-withdrawn",
        )
    return locked, latest


def _recording_identifier(
    patient: Patient, institution: Institution, recorder: Any
) -> PatientIdentifier:
    allowed = Membership.objects.filter(
        professional__user=recorder,
        institution=institution,
        role__in=RECORDER_ROLES,
        active=True,
    ).exists()
    if not allowed:
        raise PermissionDenied(
            "Directives are recorded by an admissions clerk or a doctor of the institution",
            code="consent:recorder:not-allowed",
        )
    identifier = (
        PatientIdentifier.objects.filter(
            patient=patient, institution=institution, kind=IdentifierKind.IPP
        )
        .order_by("id")
        .first()
    )
    if identifier is None:
        raise PermissionDenied(
            f"The patient is not known at {institution.name}: record the directive where the "
            "patient is known",
            code="consent:patient:unknown-here",
        )
    return identifier


def _checked(
    kind: str,
    scope: str,
    value: str,
    purposes: Iterable[str],
    valid_from: dt.datetime | None,
    valid_until: dt.datetime | None,
    *,
    patient: Patient,
) -> dict[str, Any]:
    try:
        kind_ = policy.DirectiveKind(kind)
        scope_ = policy.Scope(scope)
        purposes_ = sorted({policy.Purpose(p) for p in purposes})
    except ValueError as exc:
        raise InvalidInput(str(exc), code="consent:directive:invalid") from exc
    if scope_ not in policy.SCOPES_OF[kind_]:
        raise InvalidInput(
            f"A {kind_.value} cannot have the scope {scope_.value}",
            code="consent:directive:invalid",
        )
    if (scope_ is policy.Scope.ALL) != (value == ""):
        raise InvalidInput(
            "The scope 'all' takes no value; any other scope needs one",
            code="consent:directive:invalid",
        )
    if scope_ is policy.Scope.INSTITUTION and not Institution.objects.filter(finess=value).exists():
        raise InvalidInput(f"No institution with FINESS {value}", code="consent:directive:invalid")
    if scope_ is policy.Scope.PROFESSIONAL and not Professional.objects.filter(rpps=value).exists():
        raise InvalidInput(
            f"No professional with RPPS {value}: a directive names a professional by RPPS",
            code="consent:directive:invalid",
        )
    if (
        scope_ is policy.Scope.STUDY
        and not Manifest.objects.filter(
            study_instance_uid=value, source_identifier__patient=patient
        ).exists()
    ):
        raise InvalidInput(
            f"The patient has no registered study {value}", code="consent:directive:invalid"
        )
    if purposes_ and kind_ is not policy.DirectiveKind.CONSENT:
        raise InvalidInput("Only a consent has purposes", code="consent:directive:invalid")
    for moment in (valid_from, valid_until):
        if moment is not None and moment.tzinfo is None:
            raise InvalidInput("Dates need a time zone", code="consent:directive:invalid")
    if valid_from is not None and valid_until is not None and valid_from >= valid_until:
        raise InvalidInput(
            "valid_from must come before valid_until", code="consent:directive:dates-reversed"
        )
    return {
        "scope": scope_.value,
        "value": value,
        "purposes": [p.value for p in purposes_],
        "valid_from": valid_from,
        "valid_until": valid_until,
    }


def consent_decide_for_issuance(
    *,
    patient: Patient,
    requester: policy.Requester,
    relationship: policy.Relationship,
    purpose: policy.Purpose,
    studies: tuple[policy.StudyRef, ...],
    now: dt.datetime,
) -> policy.Decision:
    """The consent decision for issuing access (a retrieval token) to ``patient``'s studies.

    Call it inside the transaction that issues the token: it holds the patient's row until
    that transaction ends, as every change of the patient's directives does. So a
    withdrawal or an opposition either commits first (and this decision sees it) or waits
    for the token to be committed (and then its ``consent_restricting`` re-check revokes it).
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("consent_decide_for_issuance runs inside the issuing transaction")
    _lock_patient(patient)
    return consent_evaluate(
        patient=patient,
        requester=requester,
        relationship=relationship,
        purpose=purpose,
        studies=studies,
        now=now,
    )


def _lock_patient(patient: Patient) -> None:
    """Directive changes and token decisions of one patient, one at a time (PostgreSQL:
    the patient's row; SQLite serialises writers anyway)."""
    lock_patient_row(patient.pk)


def lock_patient_row(patient_id: int) -> None:
    """The patient's row, held until the transaction ends (plain SQL: every token decision
    takes it). SQLite has no row locks: its writers are serialised anyway."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT id FROM broker_patient WHERE id = %s FOR NO KEY UPDATE", [patient_id]
            )


def _require_grounds(evidence: bytes | None, note: str, *, widening: bool) -> None:
    """A change that widens sharing (a consent, an opposition or mask withdrawn, a change of
    scope or dates) needs evidence, or a note of how the patient expressed it."""
    if widening and evidence is None and not note.strip():
        raise InvalidInput(
            "A change that widens sharing needs the evidence (a signed form) or a note of how "
            "the patient expressed it",
            code="consent:directive:no-grounds",
        )


def _sealed(evidence: bytes | None) -> Any:
    if evidence is None:
        return None
    try:
        return seal(
            evidence,
            key_path=settings.RELAIS_EVIDENCE_KEY_PATH,
            max_bytes=settings.RELAIS_CONSENT_EVIDENCE_MAX_BYTES,
        )
    except EvidenceRefused as exc:
        raise InvalidInput(str(exc), code="consent:evidence:refused") from exc


def _recorded(
    recorder: Any, institution: Institution, now: dt.datetime, sealed: Any, note: str
) -> dict[str, Any]:
    evidence = None
    if sealed is not None:
        evidence = Evidence.objects.create(
            sha256=sealed.sha256,
            content_type=sealed.content_type,
            size=sealed.size,
            nonce=sealed.nonce,
            ciphertext=sealed.ciphertext,
            created_at=now,
        )
    return {
        "recorded_by": recorder.get_username(),
        "recorded_by_user_id": recorder.pk,
        "recorded_at_institution": institution,
        "recorded_at": now,
        "evidence": evidence,
        "note": note,
    }


def _audit(
    code: EventCode, version: DirectiveVersion, patient: Patient, actor: Actor, now: dt.datetime
) -> None:
    audit_record(
        code=code,
        actor=actor,
        now=now,
        patient=patient_ref(patient),
        objects=[{"type": "consent-directive", "id": version.directive_id}],
        details={
            "directive": version.directive_id,
            "version": version.version,
            "kind": version.directive.kind,
            "scope": version.scope,
            "value": version.value,
            "purposes": version.purposes,
            "valid_from": version.valid_from.isoformat() if version.valid_from else None,
            "valid_until": version.valid_until.isoformat() if version.valid_until else None,
            "withdrawn": version.withdrawn,
            "institution": version.recorded_at_institution.finess,
            "evidence_sha256": version.evidence.sha256 if version.evidence else None,
        },
    )


def _restricted(patient: Patient, version: DirectiveVersion, now: dt.datetime) -> None:
    """Let the sharing service re-check the patient's grants in this transaction (durable:
    revoked with the change, or neither), then tell anyone else once committed."""
    consent_restricting.send(
        sender=Directive,
        patient_id=patient.pk,
        directive_id=version.directive_id,
        version=version.version,
        now=now,
    )
    transaction.on_commit(
        lambda: consent_restricted.send(
            sender=Directive,
            patient_id=patient.pk,
            directive_id=version.directive_id,
            version=version.version,
        )
    )
