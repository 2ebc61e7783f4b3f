"""The audit trail in the admin: read only, for whoever holds ``audit.view_auditevent``."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from audit.models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "sequence",
        "recorded_at",
        "code",
        "outcome",
        "actor_kind",
        "actor_username",
        "actor_institution",
        "patient_id",
    )
    list_filter = ("code", "outcome", "actor_kind")
    # Exact matches only: they use audit_events_for_patient; a LIKE would scan the table.
    search_fields = ("=patient_id",)
    ordering = ("-sequence",)
    show_full_result_count = False  # no COUNT(*) over millions of rows on every page
    list_per_page = 50

    def get_readonly_fields(self, request: HttpRequest, obj: AuditEvent | None = None) -> list[str]:
        return [field.name for field in AuditEvent._meta.concrete_fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: AuditEvent | None = None) -> bool:
        return False
