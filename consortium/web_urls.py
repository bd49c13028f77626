"""Pages of the governance app (namespace ``consortium``)."""

from django.urls import path

from . import views

app_name = "consortium"

urlpatterns = [
    path("", views.OverviewView.as_view(), name="overview"),
    path("invitations/<str:token>/", views.InvitationAcceptView.as_view(), name="invitation-accept"),
]
