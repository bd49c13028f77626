"""Pages of the governance app (namespace ``consortium``)."""

from django.urls import path

from consortium.governance import views

app_name = "consortium"

C = "consortia/<slug:slug>/"
A = C + "agreements/<int:pk>/"
V = A + "versions/<int:number>/"

urlpatterns = [
    path("", views.OverviewView.as_view(), name="overview"),
    path(C, views.ConsortiumDetailView.as_view(), name="consortium-detail"),
    # Institutions ("new" comes first: it is not an institution slug).
    path(C + "institutions/new/", views.InstitutionCreateView.as_view(), name="institution-create"),
    path(
        C + "institutions/<slug:inst_slug>/",
        views.InstitutionDetailView.as_view(),
        name="institution-detail",
    ),
    path(
        C + "institutions/<slug:inst_slug>/edit/",
        views.InstitutionEditView.as_view(),
        name="institution-edit",
    ),
    # Members and invitations.
    path(C + "members/", views.MemberListView.as_view(), name="member-list"),
    path(C + "members/invite/", views.MemberInviteView.as_view(), name="member-invite"),
    path(C + "members/<int:pk>/role/", views.MembershipRoleView.as_view(), name="membership-role"),
    path(
        C + "members/<int:pk>/remove/",
        views.MembershipRemoveView.as_view(),
        name="membership-remove",
    ),
    path(
        C + "invitations/<int:pk>/revoke/",
        views.InvitationRevokeView.as_view(),
        name="invitation-revoke",
    ),
    path(
        "invitations/<str:token>/", views.InvitationAcceptView.as_view(), name="invitation-accept"
    ),
    # Agreements.
    path(C + "agreements/", views.AgreementListView.as_view(), name="agreement-list"),
    path(C + "agreements/new/", views.AgreementCreateView.as_view(), name="agreement-create"),
    path(A, views.AgreementDetailView.as_view(), name="agreement-detail"),
    path(A + "amend/", views.AgreementAmendView.as_view(), name="agreement-amend"),
    path(A + "withdraw/", views.AgreementWithdrawView.as_view(), name="agreement-withdraw"),
    path(V, views.VersionDetailView.as_view(), name="version-detail"),
    path(V + "edit/", views.VersionEditView.as_view(), name="version-edit"),
    path(V + "publish/", views.VersionPublishView.as_view(), name="version-publish"),
    path(V + "sign/", views.VersionSignView.as_view(), name="version-sign"),
]
