"""Put every professional in the role groups of their memberships (object rights on
tickets are granted to those groups; later changes follow the membership signals)."""

from __future__ import annotations

from typing import Any

from django.db import migrations


def sync_groups(apps: Any, schema_editor: Any) -> None:
    Group = apps.get_model("auth", "Group")
    Membership = apps.get_model("broker", "Membership")
    for membership in Membership.objects.filter(active=True, institution__active=True).select_related(
        "institution", "professional__user"
    ):
        group, _ = Group.objects.get_or_create(
            name=f"relais:{membership.institution.finess}:{membership.role}"
        )
        membership.professional.user.groups.add(group)


class Migration(migrations.Migration):
    dependencies = [
        ("sharing", "0001_initial"),
        ("broker", "0003_institution_tls_subject"),
        ("auth", "0012_alter_user_first_name_max_length"),
    ]

    operations = [migrations.RunPython(sync_groups, migrations.RunPython.noop)]
