"""REST API (namespace ``api``): each app's endpoints, included by dotted string so the
project package imports none of them, plus the OpenAPI schema and its UI.

- ``consortium.governance.api.urls``: consortia, institutions, memberships, invitations,
  agreements and their versions;
- ``training.api_urls``: data sets, jobs, approvals, notifications, and the site workers'
  endpoints (``/api/site/v1/``, site tokens only);
- ``audit.api_urls``: the ledger.
"""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

app_name = "api"
urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    path("", include("consortium.governance.api.urls")),
    path("", include("audit.api_urls")),
    path("", include("training.api_urls")),
]
