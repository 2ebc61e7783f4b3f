"""Reads of patients' directives, as the policy and the history views need them."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from django.conf import settings
from django.db import connection
from django.db.models import QuerySet
from django.utils.dateparse import parse_datetime

from broker.models import Patient
from consent import policy
from consent.models import Directive, DirectiveVersion


def directive_versions(*, patient: Patient) -> QuerySet[DirectiveVersion]:
    """Every version of every directive of ``patient``, oldest first within a directive."""
    return (
        DirectiveVersion.objects.filter(directive__identifier__patient=patient)
        .select_related("directive", "recorded_at_institution", "evidence")
        .defer("evidence__ciphertext")
        .order_by("directive_id", "version")
    )


def policy_directives(*, patient: Patient, as_of: datetime | None = None) -> list[policy.Directive]:
    """The patient's directives at their latest version (as recorded by ``as_of``, when
    given: what was known then), as `consent.policy` reads them.

    Every access decision runs this: one SQL query read as plain rows (the ORM's own cost
    was a millisecond of this machine's CPU per query; docs/performance.md).
    """
    sql = """
        SELECT v.directive_id, v.version, d.kind, v.scope, v.value, v.purposes,
               v.valid_from, v.valid_until, v.withdrawn
        FROM consent_directiveversion v
        JOIN consent_directive d ON d.id = v.directive_id
        JOIN broker_patientidentifier i ON i.id = d.identifier_id
        WHERE i.patient_id = %s
    """
    params: list[object] = [patient.pk]
    if as_of is not None:
        sql += " AND v.recorded_at <= %s"
        params.append(connection.ops.adapt_datetimefield_value(as_of))
    latest: dict[int, tuple[Any, ...]] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for row in cursor.fetchall():
            current = latest.get(row[0])
            if current is None or row[1] > current[1]:
                latest[row[0]] = row
    return [_as_policy(row) for row in latest.values()]


def _as_policy(row: tuple[Any, ...]) -> policy.Directive:
    directive_id, version, kind, scope, value, purposes, valid_from, valid_until, withdrawn = row
    if isinstance(purposes, str):  # SQLite gives JSON as text
        purposes = json.loads(purposes)
    return policy.Directive(
        id=directive_id,
        version=version,
        kind=policy.DirectiveKind(kind),
        scope=policy.Scope(scope),
        value=value,
        purposes=frozenset(policy.Purpose(p) for p in purposes),
        valid_from=_aware(valid_from),
        valid_until=_aware(valid_until),
        withdrawn=bool(withdrawn),
    )


def _aware(value: object) -> datetime | None:
    """A datetime column read by raw SQL: PostgreSQL gives it aware, SQLite as UTC text."""
    if value is None:
        return None
    moment = parse_datetime(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def as_policy_directive(version: DirectiveVersion) -> policy.Directive:
    return policy.Directive(
        id=version.directive_id,
        version=version.version,
        kind=policy.DirectiveKind(version.directive.kind),
        scope=policy.Scope(version.scope),
        value=version.value,
        purposes=frozenset(policy.Purpose(p) for p in version.purposes),
        valid_from=version.valid_from,
        valid_until=version.valid_until,
        withdrawn=version.withdrawn,
    )


def directive_of_patient(*, patient: Patient, directive_id: int) -> Directive | None:
    return Directive.objects.filter(pk=directive_id, identifier__patient=patient).first()


def consent_evaluate(
    *,
    patient: Patient,
    requester: policy.Requester,
    relationship: policy.Relationship,
    purpose: policy.Purpose,
    studies: tuple[policy.StudyRef, ...],
    now: datetime,
    as_recorded_at: datetime | None = None,
) -> policy.Decision:
    """The regional policy's decision for this access to ``patient``'s studies, on the
    directives as committed when it is called (or as they had been recorded by
    ``as_recorded_at``: a DPO's look at a past decision), the region's model from settings."""
    return policy.evaluate(
        policy_directives(patient=patient, as_of=as_recorded_at),
        policy.AccessQuery(requester, relationship, purpose, studies, now),
        policy.PolicySettings(outside_care_team=settings.RELAIS_CONSENT_OUTSIDE_CARE_TEAM),
    )
