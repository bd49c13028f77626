"""Pages for site data sets, training jobs and approvals (namespace ``training``)."""

from django.urls import path

from training.web import views

app_name = "training"

C = "consortia/<slug:slug>/"
D = C + "institutions/<slug:inst_slug>/datasets/"
J = C + "jobs/<int:pk>/"
W = C + "institutions/<slug:inst_slug>/worker-credentials/"

urlpatterns = [
    # Site data sets ("new" comes first: it is not a key).
    path(D, views.DatasetListView.as_view(), name="dataset-list"),
    path(D + "new/", views.DatasetCreateView.as_view(), name="dataset-create"),
    path(D + "<str:key>/edit/", views.DatasetEditView.as_view(), name="dataset-edit"),
    path(D + "<str:key>/remove/", views.DatasetRemoveView.as_view(), name="dataset-remove"),
    # Jobs.
    path(C + "jobs/", views.JobListView.as_view(), name="job-list"),
    path(C + "jobs/new/", views.JobCreateView.as_view(), name="job-create"),
    path(J, views.JobDetailView.as_view(), name="job-detail"),
    path(J + "edit/", views.JobEditView.as_view(), name="job-edit"),
    path(J + "submit/", views.JobSubmitView.as_view(), name="job-submit"),
    path(J + "cancel/", views.JobCancelView.as_view(), name="job-cancel"),
    path(J + "review/", views.JobReviewView.as_view(), name="job-review"),
    # Site worker credentials (the token is shown once, on the page that creates it).
    path(W, views.SiteCredentialListView.as_view(), name="credential-list"),
    path(
        W + "<int:pk>/revoke/", views.SiteCredentialRevokeView.as_view(), name="credential-revoke"
    ),
    # Approvals and notifications.
    path(C + "approvals/", views.ApprovalInboxView.as_view(), name="approval-inbox"),
    path("notifications/", views.NotificationListView.as_view(), name="notification-list"),
]
