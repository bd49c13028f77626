"""Auditor pages (namespace ``audit``): the ledger, the contribution and compliance reports."""

from django.urls import path

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
        "consortia/<slug:slug>/jobs/<int:pk>/report/",
        views.JobReportView.as_view(),
        name="job-report",
    ),
    path(
        "consortia/<slug:slug>/institutions/<slug:inst_slug>/report/",
        views.InstitutionReportView.as_view(),
        name="institution-report",
    ),
    path(
        "consortia/<slug:slug>/agreements/<int:agreement_pk>/versions/<int:number>/compliance/",
        views.ComplianceReportView.as_view(),
        name="compliance-report",
    ),
]
