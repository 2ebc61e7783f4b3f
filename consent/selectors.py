"""Reads of patients' directives, as the policy and the history views need them."""

from __future__ import annotations

from datetime import datetime

from django.conf import settings
from django.db.models import QuerySet

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
    given: what was known then), as `consent.policy` reads them."""
    latest: dict[int, DirectiveVersion] = {}
    versions = DirectiveVersion.objects.filter(directive__identifier__patient=patient)
    if as_of is not None:
        versions = versions.filter(recorded_at__lte=as_of)
    for version in versions.select_related("directive"):
        current = latest.get(version.directive_id)
        if current is None or version.version > current.version:
            latest[version.directive_id] = version
    return [as_policy_directive(v) for v in latest.values()]


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
