"""REST API (namespace ``api``): each app's endpoints, included by dotted string so the
project package imports none of them, plus the OpenAPI schema and its UI.

- ``consortium.governance.api.urls``: consortia, institutions, memberships, invitations,
  agreements and their versions;
- ``training.api_urls``: data sets, jobs, approvals, notifications, and the site workers'
  endpoints (``/api/site/v1/``, site tokens only);
- ``audit.api_urls``: the ledger.
"""

from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

app_name = "api"
urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view loads its start-up script from ?script instead of inline, as the site's
    # Content-Security-Policy asks (consortium.core.security_headers).
    path("docs/", SpectacularSwaggerSplitView.as_view(url_name="api:schema"), name="docs"),
    path("", include("consortium.governance.api.urls")),
    path("", include("audit.api_urls")),
    path("", include("training.api_urls")),
]
