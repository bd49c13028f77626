"""The ledger's endpoints, included into the ``api`` namespace by ``consortium.api_urls``."""

from rest_framework.routers import SimpleRouter

from audit.api import LedgerEntryViewSet

router = SimpleRouter()
router.register("ledger", LedgerEntryViewSet, basename="ledger-entry")

urlpatterns = router.urls
