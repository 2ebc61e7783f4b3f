"""Object-level rights on tickets (django-guardian).

A right on one ticket is granted to a person (the named specialist of an avis) or to the
group of a role at an institution (the radiologists of the source institution for a
treatment request, those of the recipient institution for an avis sent to its
department). Those groups follow the memberships: :func:`membership_groups_sync` runs
whenever a membership changes (signals in ``apps.py``).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth.models import Group
from django.db.models import QuerySet
from guardian.core import ObjectPermissionChecker
from guardian.shortcuts import assign_perm, get_objects_for_user, remove_perm

from broker.models import Institution, Membership, Role
from sharing.models import AccessRequest

DECIDE = "sharing.decide_accessrequest"
ANSWER = "sharing.answer_accessrequest"
GROUP_PREFIX = "relais:"


def role_group_name(institution: Institution, role: str) -> str:
    return f"{GROUP_PREFIX}{institution.finess}:{role}"


def role_group(institution: Institution, role: str) -> Group:
    group, _ = Group.objects.get_or_create(name=role_group_name(institution, role))
    return group


def membership_groups_sync(user: Any) -> None:
    """Put ``user`` in exactly the role groups of their active memberships."""
    wanted = {
        role_group(m.institution, m.role)
        for m in Membership.objects.filter(
            professional__user=user, active=True, institution__active=True
        ).select_related("institution")
    }
    current = set(user.groups.filter(name__startswith=GROUP_PREFIX))
    user.groups.remove(*(current - wanted))
    user.groups.add(*(wanted - current))


def grant_decision(ticket: AccessRequest) -> None:
    """Give the right to approve or deny ``ticket`` to whoever the purpose names."""
    if ticket.recipient is not None:
        for permission in (DECIDE, ANSWER):
            assign_perm(permission, ticket.recipient.user, ticket)
    elif ticket.recipient_institution is not None:
        # The department's radiologists may take it; who takes it answers it.
        assign_perm(DECIDE, role_group(ticket.recipient_institution, Role.RADIOLOGIST), ticket)
    elif ticket.source_institution is not None:
        assign_perm(DECIDE, role_group(ticket.source_institution, Role.RADIOLOGIST), ticket)


def grant_taken(ticket: AccessRequest, user: Any) -> None:
    """The specialist who took an avis sent to a department holds it alone from then on."""
    assert ticket.recipient_institution is not None
    remove_perm(DECIDE, role_group(ticket.recipient_institution, Role.RADIOLOGIST), ticket)
    for permission in (DECIDE, ANSWER):
        assign_perm(permission, user, ticket)


def _has(user: Any, permission: str, ticket: AccessRequest) -> bool:
    """An object right granted on this ticket (a superuser's blanket rights do not count:
    approving and answering are a clinician's acts)."""
    if not getattr(user, "pk", None) or not getattr(user, "is_active", False):
        return False
    if getattr(user, "is_superuser", False):
        return False
    return ObjectPermissionChecker(user).has_perm(permission.split(".", 1)[1], ticket)


def may_decide(user: Any, ticket: AccessRequest) -> bool:
    return _has(user, DECIDE, ticket)


def may_answer(user: Any, ticket: AccessRequest) -> bool:
    return _has(user, ANSWER, ticket)


def tickets_user_may_decide(user: Any) -> QuerySet[AccessRequest]:
    if getattr(user, "is_superuser", False):
        return AccessRequest.objects.none()
    return get_objects_for_user(  # type: ignore[no-any-return]
        user, DECIDE, klass=AccessRequest, accept_global_perms=False, with_superuser=False
    )
