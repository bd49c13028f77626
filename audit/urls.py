"""Auditor pages (namespace ``audit``)."""

from django.urls import path

from . import views

app_name = "audit"
urlpatterns = [
    path("consortia/<slug:slug>/ledger/", views.LedgerView.as_view(), name="ledger"),
    path(
        "consortia/<slug:slug>/ledger/verify/",
        views.LedgerVerifyView.as_view(),
        name="ledger-verify",
    ),
]
