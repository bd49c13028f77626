"""The Django admin stays for operators. Governance records that carry legal
weight (published versions, signatures, withdrawals) are read-only here: they
change only through the services, which write the ledger."""

from django.contrib import admin

from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Consortium,
    Institution,
    Invitation,
    Membership,
    Signature,
    Withdrawal,
)


class ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Consortium)
class ConsortiumAdmin(ReadOnlyAdmin):
    list_display = ("name", "slug", "created_at")


@admin.register(Institution)
class InstitutionAdmin(ReadOnlyAdmin):
    list_display = ("name", "slug", "consortium", "country", "created_at")
    list_filter = ("consortium",)
    search_fields = ("name", "slug")


@admin.register(Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ("user", "role", "institution", "consortium", "created_at")
    list_filter = ("consortium", "role")
    search_fields = ("user__username", "user__email")


@admin.register(Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    list_display = ("email", "role", "institution", "consortium", "expires_at", "status")
    exclude = ("token_hash",)


@admin.register(Agreement)
class AgreementAdmin(ReadOnlyAdmin):
    list_display = ("title", "consortium", "created_at")


@admin.register(AgreementVersion)
class AgreementVersionAdmin(ReadOnlyAdmin):
    list_display = ("agreement", "number", "status", "valid_from", "valid_until", "published_at")
    list_filter = ("status",)


@admin.register(Signature)
class SignatureAdmin(ReadOnlyAdmin):
    list_display = ("institution", "version", "typed_name", "signed_at", "content_digest")


@admin.register(Withdrawal)
class WithdrawalAdmin(ReadOnlyAdmin):
    list_display = ("institution", "agreement", "withdrawn_at", "withdrawn_by_repr")
