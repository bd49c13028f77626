"""The governance endpoints, included into the ``api`` namespace by ``consortium.api_urls``."""

from rest_framework.routers import SimpleRouter

from consortium.governance.api import views

router = SimpleRouter()
router.register("consortia", views.ConsortiumViewSet, basename="consortium")
router.register("institutions", views.InstitutionViewSet, basename="institution")
router.register("memberships", views.MembershipViewSet, basename="membership")
router.register("invitations", views.InvitationViewSet, basename="invitation")
router.register("agreements", views.AgreementViewSet, basename="agreement")
router.register("agreement-versions", views.AgreementVersionViewSet, basename="agreement-version")

urlpatterns = router.urls
