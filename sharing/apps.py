from __future__ import annotations

from typing import Any

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_save


class SharingConfig(AppConfig):
    name = "sharing"
    verbose_name = "Sharing"

    def ready(self) -> None:
        from broker.models import Membership
        from consent.signals import consent_restricting

        post_save.connect(_membership_changed, sender=Membership, dispatch_uid="sharing-groups")
        post_delete.connect(_membership_changed, sender=Membership, dispatch_uid="sharing-groups")
        consent_restricting.connect(_consent_restricting, dispatch_uid="sharing-consent")


def _membership_changed(sender: Any, instance: Any, **kwargs: Any) -> None:
    from sharing.permissions import membership_groups_sync

    if kwargs.get("raw"):
        return
    membership_groups_sync(instance.professional.user)


def _consent_restricting(sender: Any, patient_id: int, now: Any, **kwargs: Any) -> None:
    from sharing.services import grants_recheck_consent

    grants_recheck_consent(patient_id=patient_id, now=now)
