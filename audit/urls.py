"""Auditor pages (namespace ``audit``): the ledger, the contribution and compliance reports."""

from django.urls import path

import consortium.core.converters  # noqa: F401 - registers the <id:...> path converter
from audit import views

app_name = "audit"
urlpatterns = [
    path("consortia/<slug:slug>/ledger/", views.LedgerView.as_view(), name="ledger"),
    path(
        "consortia/<slug:slug>/ledger/verify/",
        views.LedgerVerifyView.as_view(),
        name="ledger-verify",
    ),
    path(
        "consortia/<slug:slug>/jobs/<id:pk>/report/",
        views.JobReportView.as_view(),
        name="job-report",
    ),
    path(
        "consortia/<slug:slug>/institutions/<slug:inst_slug>/report/",
        views.InstitutionReportView.as_view(),
        name="institution-report",
    ),
    path(
        "consortia/<slug:slug>/agreements/<id:agreement_pk>/versions/<id:number>/compliance/",
        views.ComplianceReportView.as_view(),
        name="compliance-report",
    ),
]
