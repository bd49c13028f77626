"""The app's own error pages (consortium.core.error_pages): in its layout, with a way back, and
never Django's technical page (URL patterns, settings, a traceback) to whoever asked, also with
``DEBUG`` on, as in development and the demo."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import path

from consortium import urls as root_urls


def _boom(request):
    raise RuntimeError("a bug with a secret in its message: hunter2")


urlpatterns = [path("boom/", _boom), *root_urls.urlpatterns]

TECHNICAL = 'content="NONE,NOARCHIVE"'


def _looks_like_ours(body: str) -> None:
    assert TECHNICAL not in body
    assert 'class="topbar"' in body  # the app's layout
    assert "Go to your consortia" in body  # a way back


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False])
def test_a_missing_page_is_the_apps_404(client, settings, debug, cast):
    settings.DEBUG = debug
    client.force_login(cast.outsider)
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    body = response.content.decode()
    _looks_like_ours(body)
    assert "does not exist, or is not yours to see" in body
    assert "URLconf" not in body and "consortium.urls" not in body


@pytest.mark.django_db
def test_an_object_hidden_from_an_outsider_is_the_apps_404_with_debug_on(client, settings, cast):
    settings.DEBUG = True
    client.force_login(cast.outsider)
    response = client.get(f"/consortia/{cast.consortium.slug}/")
    assert response.status_code == 404
    _looks_like_ours(response.content.decode())


@pytest.mark.django_db
@pytest.mark.parametrize("debug", [True, False])
def test_a_crash_is_the_apps_500_and_tells_nothing_of_the_bug(settings, debug):
    settings.DEBUG = debug
    settings.ROOT_URLCONF = __name__
    response = Client(raise_request_exception=False).get("/boom/")
    assert response.status_code == 500
    body = response.content.decode()
    _looks_like_ours(body)
    assert "Something went wrong on our side" in body
    assert "hunter2" not in body and "Traceback" not in body


@pytest.mark.django_db
def test_the_technical_pages_are_there_for_a_developer_who_asks(client, settings):
    settings.DEBUG = True
    settings.TECHNICAL_ERROR_PAGES = True
    response = client.get("/no/such/page/")
    assert response.status_code == 404
    assert TECHNICAL in response.content.decode()


@pytest.mark.django_db
def test_a_refused_form_post_is_the_apps_page(settings, cast):
    settings.DEBUG = True
    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.admin)
    response = client.post("/accounts/logout/", {})
    assert response.status_code == 403
    body = response.content.decode()
    _looks_like_ours(body)
    assert "This form could not be accepted" in body
    assert "Nothing was changed" in body


@pytest.mark.django_db
def test_the_api_keeps_its_json_errors(client, settings, cast):
    settings.DEBUG = True
    client.force_login(cast.outsider)
    response = client.get("/api/consortia/999999/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")


@pytest.mark.django_db
def test_the_favicon_is_served_from_the_app(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301
    assert response["Location"].endswith("favicon.svg")
    page = client.get("/accounts/login/").content.decode()
    assert 'rel="icon"' in page and "favicon.svg" in page
