"""Root URLconf. The apps beside ``consortium`` are included by dotted string so
nothing here imports upward."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.http import HttpResponsePermanentRedirect
from django.templatetags.static import static
from django.urls import include, path

from consortium.core.passwords import PasswordResetConfirmView, PasswordResetView
from consortium.health import health_view
from consortium.observability.metrics import metrics_view


def favicon_redirect(request):
    """To the icon's static URL, resolved per request: in production the URL carries the
    content hash from the manifest that collectstatic writes after this module is imported."""
    return HttpResponsePermanentRedirect(static("favicon.svg"))


urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    # Password reset by email and change when signed in: Django's views, our templates
    # (templates/registration/); the reset page answers the same for a known and an unknown
    # address, its link is built from SITE_URL and a reset lifts the account's sign-in lock
    # (consortium.core.passwords).
    path(
        "accounts/password/reset/",
        PasswordResetView.as_view(),
        name="password_reset",
    ),
    path(
        "accounts/password/reset/sent/",
        auth_views.PasswordResetDoneView.as_view(),
        name="password_reset_done",
    ),
    path(
        "accounts/password/reset/<uidb64>/<token>/",
        PasswordResetConfirmView.as_view(),
        name="password_reset_confirm",
    ),
    path(
        "accounts/password/reset/done/",
        auth_views.PasswordResetCompleteView.as_view(),
        name="password_reset_complete",
    ),
    path(
        "accounts/password/change/",
        auth_views.PasswordChangeView.as_view(),
        name="password_change",
    ),
    path(
        "accounts/password/change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    path("admin/", admin.site.urls),
    path("health/", health_view, name="health"),
    # Browsers ask for /favicon.ico whatever the page's <link rel="icon"> says.
    path("favicon.ico", favicon_redirect),
    path("metrics", metrics_view, name="metrics"),
    path("api/", include("consortium.api_urls")),
    path("", include("audit.urls")),
    path("", include("training.urls")),
    # Namespace "consortium": governance's pages and the dashboard pages beside them.
    path("", include("consortium.dashboard.urls")),
]
