"""Root URLconf. The apps beside ``consortium`` are included by dotted string so
nothing here imports upward."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from consortium.health import health_view
from consortium.observability.metrics import metrics_view

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("health/", health_view, name="health"),
    path("metrics", metrics_view, name="metrics"),
    path("api/", include("consortium.api_urls")),
    path("", include("audit.urls")),
    path("", include("training.urls")),
    # Namespace "consortium": governance's pages and the dashboard pages beside them.
    path("", include("consortium.dashboard.urls")),
]
