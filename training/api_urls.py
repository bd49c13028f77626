"""The training endpoints, included into the ``api`` namespace by ``consortium.api_urls``:
data sets, jobs, approvals and notifications (browser users' tokens and sessions), and the
site workers' endpoints under ``site/`` (site tokens only)."""

from rest_framework.routers import SimpleRouter

from training.rounds import site_api
from training.web.api import approvals, datasets, jobs, notifications

router = SimpleRouter()
router.register("datasets", datasets.SiteDatasetViewSet, basename="dataset")
router.register("jobs", jobs.TrainingJobViewSet, basename="job")
router.register("approvals", approvals.ApprovalInboxViewSet, basename="approval")
router.register("notifications", notifications.NotificationViewSet, basename="notification")

urlpatterns = [*router.urls, *site_api.urlpatterns]
