"""Pages for site data sets, training jobs and approvals (namespace ``training``)."""

from django.urls import path

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from training.web.views import (
    approvals,
    credentials,
    datasets,
    job_model,
    jobs,
    notifications,
    validation_sets,
)

app_name = "training"

C = "consortia/<slug:slug>/"
D = C + "institutions/<slug:inst_slug>/datasets/"
J = C + "jobs/<id:pk>/"
W = C + "institutions/<slug:inst_slug>/worker-credentials/"
V = C + "institutions/<slug:inst_slug>/validation-sets/"

urlpatterns = [
    # Site data sets ("new" comes first: it is not a key).
    path(D, datasets.DatasetListView.as_view(), name="dataset-list"),
    path(D + "new/", datasets.DatasetCreateView.as_view(), name="dataset-create"),
    path(D + "<str:key>/edit/", datasets.DatasetEditView.as_view(), name="dataset-edit"),
    path(D + "<str:key>/remove/", datasets.DatasetRemoveView.as_view(), name="dataset-remove"),
    # Central validation sets (a data steward's upload to the consortium's server).
    path(V, validation_sets.ValidationSetView.as_view(), name="validation-sets"),
    # Jobs.
    path(C + "jobs/", jobs.JobListView.as_view(), name="job-list"),
    path(C + "jobs/new/", jobs.JobCreateView.as_view(), name="job-create"),
    path(C + "jobs/compare/", jobs.JobCompareView.as_view(), name="job-compare"),
    path(C + "jobs/new/budget/", jobs.JobBudgetPreviewView.as_view(), name="job-create-budget"),
    path(J, jobs.JobDetailView.as_view(), name="job-detail"),
    path(J + "edit/", jobs.JobEditView.as_view(), name="job-edit"),
    path(J + "edit/budget/", jobs.JobEditBudgetPreviewView.as_view(), name="job-edit-budget"),
    path(J + "submit/", jobs.JobSubmitView.as_view(), name="job-submit"),
    path(J + "cancel/", jobs.JobCancelView.as_view(), name="job-cancel"),
    path(J + "review/", approvals.JobReviewView.as_view(), name="job-review"),
    path(J + "audit-picture.png", jobs.JobAuditPictureView.as_view(), name="job-audit-picture"),
    path(
        J + "models/<id:round_index>/download/",
        job_model.JobModelDownloadView.as_view(),
        name="job-model-download",
    ),
    # Site worker credentials (the token is shown once, on the page that creates it).
    path(W, credentials.SiteCredentialListView.as_view(), name="credential-list"),
    path(
        W + "<id:pk>/revoke/",
        credentials.SiteCredentialRevokeView.as_view(),
        name="credential-revoke",
    ),
    # Approvals and notifications.
    path(C + "approvals/", approvals.ApprovalInboxView.as_view(), name="approval-inbox"),
    path("notifications/", notifications.NotificationListView.as_view(), name="notification-list"),
]
