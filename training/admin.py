"""Read-only admin for operators: jobs, decisions and budgets change only
through the services of ``training.jobs`` and ``training.rounds``, which write the ledger."""

from django.contrib import admin

from consortium.governance.admin import ReadOnlyAdmin
from training.models import Approval, JobParticipant, PrivacyReservation, SiteDataset, TrainingJob


class ParticipantInline(admin.TabularInline):
    model = JobParticipant
    extra = 0
    can_delete = False
    readonly_fields = ("institution", "status", "removed_at", "removed_reason")

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(TrainingJob)
class TrainingJobAdmin(ReadOnlyAdmin):
    list_display = ("pk", "title", "consortium", "state", "proposer_repr", "created_at")
    list_filter = ("state", "consortium")
    search_fields = ("title", "spec_digest")
    inlines = [ParticipantInline]


@admin.register(SiteDataset)
class SiteDatasetAdmin(ReadOnlyAdmin):
    list_display = ("key", "institution", "modality", "num_records", "n_classes")
    list_filter = ("modality",)


@admin.register(Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    list_display = ("job", "institution", "decision", "decided_by_repr", "decided_at")
    list_filter = ("decision",)


@admin.register(PrivacyReservation)
class PrivacyReservationAdmin(ReadOnlyAdmin):
    list_display = ("job", "institution", "epsilon", "delta", "status", "created_at")
    list_filter = ("status",)
