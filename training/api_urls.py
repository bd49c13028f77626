"""The training endpoints, included into the ``api`` namespace by ``consortium.api_urls``:
data sets, jobs, approvals and notifications (browser users' tokens and sessions), and the
site workers' endpoints under ``site/`` (site tokens only)."""

from rest_framework.routers import SimpleRouter

from training.rounds import site_api
from training.web import api

router = SimpleRouter()
router.register("datasets", api.SiteDatasetViewSet, basename="dataset")
router.register("jobs", api.TrainingJobViewSet, basename="job")
router.register("approvals", api.ApprovalInboxViewSet, basename="approval")
router.register("notifications", api.NotificationViewSet, basename="notification")

urlpatterns = [*router.urls, *site_api.urlpatterns]
