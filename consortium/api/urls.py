"""REST API (namespace ``api``) and its OpenAPI schema and UI.

The ledger's endpoints live with the ledger in ``audit.api``, and the training
endpoints (data sets, jobs, approvals, notifications) in ``training.api``, and the
site workers' endpoints (``/api/site/``, site tokens only) in ``training.site_api``;
the API layer may import them (it sits above those apps).
"""

from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView
from rest_framework.routers import SimpleRouter

from audit.api import LedgerEntryViewSet
from training import api as training_api
from training import site_api

from . import views

router = SimpleRouter()
router.register("consortia", views.ConsortiumViewSet, basename="consortium")
router.register("institutions", views.InstitutionViewSet, basename="institution")
router.register("memberships", views.MembershipViewSet, basename="membership")
router.register("invitations", views.InvitationViewSet, basename="invitation")
router.register("agreements", views.AgreementViewSet, basename="agreement")
router.register("agreement-versions", views.AgreementVersionViewSet, basename="agreement-version")
router.register("ledger", LedgerEntryViewSet, basename="ledger-entry")
router.register("datasets", training_api.SiteDatasetViewSet, basename="dataset")
router.register("jobs", training_api.TrainingJobViewSet, basename="job")
router.register("approvals", training_api.ApprovalInboxViewSet, basename="approval")
router.register("notifications", training_api.NotificationViewSet, basename="notification")

app_name = "api"
urlpatterns = [
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="docs"),
    *router.urls,
    # The site workers' endpoints (site tokens only): /api/site/...
    *site_api.urlpatterns,
]
