"""Governance's pages. Their namespace, ``consortium``, is shared with the pages that compose
several apps (the overview, the consortium dashboard, an institution's page), so this list is
not included on its own: :mod:`consortium.dashboard.urls`, the namespace's one URLconf, adds
those pages to it (Django allows one URLconf per namespace)."""

from django.urls import path

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from consortium.governance.views import (
    agreements,
    api_tokens,
    consortia,
    institutions,
    members,
    second_factor,
    withdrawals,
)

C = "consortia/<slug:slug>/"
A = C + "agreements/<id:pk>/"
V = A + "versions/<id:number>/"

urlpatterns = [
    # The operator starts a consortium. "new" is not a consortium slug (the services refuse
    # it), and this list comes before the dashboard's, whose consortium page takes any slug.
    path("consortia/new/", consortia.ConsortiumStartView.as_view(), name="consortium-start"),
    # Institutions. "new" is not an institution slug (the services refuse it), and this list
    # comes before the dashboard's, whose institution page takes any slug.
    path(
        C + "institutions/new/",
        institutions.InstitutionCreateView.as_view(),
        name="institution-create",
    ),
    path(
        C + "institutions/<slug:inst_slug>/edit/",
        institutions.InstitutionEditView.as_view(),
        name="institution-edit",
    ),
    # Members and invitations.
    path(C + "members/", members.MemberListView.as_view(), name="member-list"),
    path(C + "members/invite/", members.MemberInviteView.as_view(), name="member-invite"),
    path(C + "members/<id:pk>/role/", members.MembershipRoleView.as_view(), name="membership-role"),
    path(
        C + "members/<id:pk>/remove/",
        members.MembershipRemoveView.as_view(),
        name="membership-remove",
    ),
    path(
        C + "invitations/<id:pk>/revoke/",
        members.InvitationRevokeView.as_view(),
        name="invitation-revoke",
    ),
    path(
        "invitations/<str:token>/",
        members.InvitationAcceptView.as_view(),
        name="invitation-accept",
    ),
    # The signed-in person's own API tokens (beside the password pages under accounts/).
    path("accounts/api-tokens/", api_tokens.APITokenListView.as_view(), name="api-token-list"),
    path(
        "accounts/api-tokens/<id:pk>/revoke/",
        api_tokens.APITokenRevokeView.as_view(),
        name="api-token-revoke",
    ),
    # The signed-in person's second factor (consortium.core.second_factor).
    path("account/two-factor/", second_factor.StatusView.as_view(), name="two-factor"),
    path("account/two-factor/setup/", second_factor.SetupView.as_view(), name="two-factor-setup"),
    path(
        "account/two-factor/verify/", second_factor.VerifyView.as_view(), name="two-factor-verify"
    ),
    path(
        "account/two-factor/backup-codes/",
        second_factor.BackupCodesView.as_view(),
        name="two-factor-backup-codes",
    ),
    path(
        "account/two-factor/remove/", second_factor.RemoveView.as_view(), name="two-factor-remove"
    ),
    # Agreements.
    path(C + "agreements/", agreements.AgreementListView.as_view(), name="agreement-list"),
    path(C + "agreements/new/", agreements.AgreementCreateView.as_view(), name="agreement-create"),
    path(A, agreements.AgreementDetailView.as_view(), name="agreement-detail"),
    path(A + "amend/", agreements.AgreementAmendView.as_view(), name="agreement-amend"),
    path(A + "withdraw/", withdrawals.AgreementWithdrawView.as_view(), name="agreement-withdraw"),
    path(V, agreements.VersionDetailView.as_view(), name="version-detail"),
    path(V + "edit/", agreements.VersionEditView.as_view(), name="version-edit"),
    path(V + "publish/", agreements.VersionPublishView.as_view(), name="version-publish"),
    path(V + "sign/", agreements.VersionSignView.as_view(), name="version-sign"),
]
