"""Read-only admin for the ledger: the ledger is written only by ``append_entry``."""

from __future__ import annotations

from django.contrib import admin

from audit.models import LedgerEntry, LedgerHead


class ReadOnlyAdmin(admin.ModelAdmin):
    """Lists and shows rows; no add, change or delete, not even for superusers."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def get_readonly_fields(self, request, obj=None):
        return [f.name for f in self.model._meta.fields]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = (
        "seq",
        "created_at",
        "event",
        "actor_repr",
        "consortium_slug",
        "institution_slug",
        "subject_type",
        "subject_id",
    )
    list_filter = ("event", "consortium_slug")
    search_fields = ("event", "actor_repr", "subject_id", "consortium_slug", "institution_slug")
    ordering = ("-seq",)
    date_hierarchy = None
    show_full_result_count = False
    actions = None


@admin.register(LedgerHead)
class LedgerHeadAdmin(ReadOnlyAdmin):
    list_display = ("id", "seq", "entry_hash")
    actions = None
