"""Only operators read /metrics: staff and superusers signed in, or a scraper with the bearer
token; everyone else is refused with a plain answer, never sent to the sign-in page."""

from __future__ import annotations

import pytest
from django.test import Client

from tests.support.factories import UserFactory

TOKEN = "m" * 40


@pytest.fixture
def staff(db):
    return UserFactory(username="ops", is_staff=True)


@pytest.fixture
def superuser(db):
    return UserFactory(username="root", is_superuser=True, is_staff=False)


def _get(client, **headers):
    return client.get("/metrics", headers=headers)


def test_anonymous_is_told_to_authenticate_not_redirected(db):
    response = _get(Client())
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert "operators" in response.content.decode()
    assert "Location" not in response


@pytest.mark.parametrize("who", ["other_member", "admin", "outsider"])
def test_members_who_are_not_staff_are_refused(cast, who):
    # The consortium's own administrator is not an operator of the server.
    response = _get(cast.client_for(who))
    assert response.status_code == 403
    assert "operators" in response.content.decode()


def test_staff_and_superusers_read_it(cast, staff, superuser):
    for user in (staff, superuser):
        client = Client()
        client.force_login(user)
        response = _get(client)
        assert response.status_code == 200, response.content
        assert response["Content-Type"].startswith("text/plain")
        assert b"fl_rounds" in response.content
        assert "no-cache" in response["Cache-Control"] or "max-age=0" in response["Cache-Control"]


def test_the_bearer_token_lets_a_scraper_in(cast, settings):
    settings.METRICS_TOKEN = TOKEN
    response = _get(Client(), Authorization=f"Bearer {TOKEN}")
    assert response.status_code == 200
    assert b"# HELP fl_broker_up" in response.content


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN[:-1]}", f"Bearer {TOKEN}x", "Bearer ", "bearer nope"]
)
def test_a_wrong_bearer_token_is_refused(db, settings, header):
    settings.METRICS_TOKEN = TOKEN
    response = _get(Client(), Authorization=header)
    assert response.status_code == 403
    assert "METRICS_TOKEN" in response.content.decode()
    assert "Location" not in response


def test_a_wrong_token_is_refused_even_with_a_staff_session(staff, settings):
    settings.METRICS_TOKEN = TOKEN
    client = Client()
    client.force_login(staff)
    assert _get(client, Authorization="Bearer wrong").status_code == 403


def test_no_bearer_token_is_accepted_while_the_setting_is_unset(db, settings):
    settings.METRICS_TOKEN = ""
    response = _get(Client(), Authorization="Bearer ")
    assert response.status_code == 403
    assert "METRICS_TOKEN is not set" in response.content.decode()


def test_only_get(staff):
    client = Client()
    client.force_login(staff)
    assert client.post("/metrics").status_code == 405


def test_openmetrics_when_the_scraper_asks(staff):
    client = Client()
    client.force_login(staff)
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.status_code == 200
    assert response["Content-Type"].startswith("application/openmetrics-text")
    assert response.content.rstrip().endswith(b"# EOF")


@pytest.mark.django_db(transaction=True)
def test_served_through_the_asgi_handler_too(settings):
    """Daphne runs the ASGI handler: the chain, latency middleware first, answers there."""
    from asgiref.sync import async_to_sync
    from django.test import AsyncClient

    settings.METRICS_TOKEN = TOKEN
    response = async_to_sync(AsyncClient().get)(
        "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200
    assert b"fl_http_request_duration_seconds" in response.content
