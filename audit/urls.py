"""Auditor pages (namespace ``audit``)."""

app_name = "audit"
urlpatterns: list = []
