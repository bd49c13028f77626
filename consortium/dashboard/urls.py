"""The ``consortium`` namespace's one URLconf: governance's pages and the pages that compose
several apps (Django allows one URLconf per namespace, so governance's list is added here
rather than included on its own)."""

from django.urls import path

from consortium.dashboard import views
from consortium.governance.urls import C
from consortium.governance.urls import urlpatterns as governance_patterns

app_name = "consortium"

urlpatterns = [
    # Governance's first: its institutions/new/ must win over the institution page's slug.
    *governance_patterns,
    path("", views.OverviewView.as_view(), name="overview"),
    path(C, views.ConsortiumDetailView.as_view(), name="consortium-detail"),
    path(
        C + "institutions/<slug:inst_slug>/",
        views.InstitutionDetailView.as_view(),
        name="institution-detail",
    ),
]
