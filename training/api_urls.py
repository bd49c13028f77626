"""The training endpoints, included into the ``api`` namespace by ``consortium.api_urls``:
data sets, jobs, approvals and notifications (browser users' tokens and sessions), and the
site workers' endpoints under ``site/v<protocol>/`` (site tokens only). The site API's
prefix is set here and only here (``training.site.protocol.SITE_API_SEGMENT``), so every
pattern of ``training.rounds.site_api`` is served under it."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from training.rounds import (
    site_api,
    site_api_audit,
    site_api_evaluation,
    site_api_ledger,
    site_api_upload,
)
from training.site.protocol import SITE_API_SEGMENT
from training.web.api import approvals, datasets, jobs, notifications, validation_sets

router = SimpleRouter()
router.register("datasets", datasets.SiteDatasetViewSet, basename="dataset")
router.register("jobs", jobs.TrainingJobViewSet, basename="job")
router.register("approvals", approvals.ApprovalInboxViewSet, basename="approval")
router.register("notifications", notifications.NotificationViewSet, basename="notification")
router.register(
    "validation-sets", validation_sets.CentralValidationSetViewSet, basename="validation-set"
)

urlpatterns = [
    *router.urls,
    path(
        SITE_API_SEGMENT,
        include(
            [
                *site_api.urlpatterns,
                *site_api_upload.urlpatterns,
                *site_api_evaluation.urlpatterns,
                *site_api_audit.urlpatterns,
                *site_api_ledger.urlpatterns,
            ]
        ),
    ),
]
