"""Sessions end after ``SESSION_IDLE_MINUTES`` without the person's activity and
``SESSION_MAX_AGE_HOURS`` after sign-in (``consortium.core.session_timeout``). Time passes by
moving the session's own clocks back, not by sleeping."""

from __future__ import annotations

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings
from django.contrib.auth import SESSION_KEY
from django.urls import reverse

from consortium.core.live import SIGNED_OUT
from consortium.core.session_timeout import LAST_ACTIVITY_AT, SIGNED_IN_AT
from tests.support.training_fixtures import make_scene
from tests.web.test_settings import load_settings


def _age(client, *, idle_minutes: float = 0, signed_in_hours: float = 0) -> None:
    """Move the session's clocks back: last activity ``idle_minutes`` ago, sign-in
    ``signed_in_hours`` ago (at least as long ago as the last activity)."""
    session = client.session
    now = time.time()
    session[LAST_ACTIVITY_AT] = now - idle_minutes * 60
    session[SIGNED_IN_AT] = now - max(signed_in_hours * 3600, idle_minutes * 60)
    session.save()


@pytest.fixture
def page(cast):
    return reverse("consortium:consortium-detail", args=[cast.consortium.slug])


def _signed_in(cast):
    client = cast.client_for("researcher")
    assert SIGNED_IN_AT in client.session and LAST_ACTIVITY_AT in client.session
    return client


def test_an_idle_session_is_signed_out_and_told_why(cast, page, settings):
    settings.SESSION_IDLE_MINUTES = 30
    client = _signed_in(cast)
    _age(client, idle_minutes=31)
    response = client.get(page)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("login"))
    assert SESSION_KEY not in client.session  # flushed, not only refused this once
    login = client.get(response["Location"])
    assert "signed out after 30 minutes without activity" in login.content.decode()
    assert client.get(page).status_code == 302


def test_activity_keeps_the_session_and_moves_its_clock(cast, page, settings):
    settings.SESSION_IDLE_MINUTES = 30
    client = _signed_in(cast)
    _age(client, idle_minutes=29)
    before = client.session[LAST_ACTIVITY_AT]
    assert client.get(page).status_code == 200
    assert client.session[LAST_ACTIVITY_AT] > before + 28 * 60
    _age(client, idle_minutes=29)
    assert client.get(page).status_code == 200  # 58 minutes in all, never 30 idle


def test_a_live_pages_own_refresh_is_not_activity(cast, page, settings):
    """The page refreshing itself after a ledger change does not keep the session alive, and
    once the session has ended htmx is sent to the sign-in page (not given it to swap in)."""
    settings.SESSION_IDLE_MINUTES = 30
    client = _signed_in(cast)
    _age(client, idle_minutes=20)
    before = client.session[LAST_ACTIVITY_AT]
    background = {"HTTP_X_BACKGROUND_REFRESH": "1", "HTTP_HX_REQUEST": "true"}
    assert client.get(page, **background).status_code == 200
    assert client.session[LAST_ACTIVITY_AT] == before
    _age(client, idle_minutes=31)
    current = f"http://testserver{page}?tab=x"
    response = client.get(page, HTTP_HX_CURRENT_URL=current, **background)
    assert response.status_code == 204
    assert response["HX-Redirect"] == reverse("login") + "?next=" + page + "%3Ftab%3Dx"
    assert SESSION_KEY not in client.session


def test_a_session_ends_at_its_maximum_age_however_active(cast, page, settings):
    settings.SESSION_MAX_AGE_HOURS = 12
    client = _signed_in(cast)
    _age(client, idle_minutes=0, signed_in_hours=11.9)
    assert client.get(page).status_code == 200
    _age(client, idle_minutes=0, signed_in_hours=12.1)
    response = client.get(page, follow=True)
    assert "a session lasts at most 12 hours" in response.content.decode()
    assert SESSION_KEY not in client.session


def test_zero_switches_a_limit_off(cast, page, settings):
    settings.SESSION_IDLE_MINUTES = 0
    settings.SESSION_MAX_AGE_HOURS = 0
    client = _signed_in(cast)
    _age(client, idle_minutes=60 * 24 * 30, signed_in_hours=24 * 30)
    assert client.get(page).status_code == 200


def test_signing_in_again_starts_the_clocks_afresh(cast, page, settings):
    client = _signed_in(cast)
    _age(client, idle_minutes=10, signed_in_hours=11)
    client.force_login(cast.researcher)  # the same person: login() keeps the session's data
    assert time.time() - client.session[SIGNED_IN_AT] < 60


def test_the_settings_refuse_a_negative_limit():
    result = load_settings(SESSION_IDLE_MINUTES="-5")
    assert result.returncode != 0
    assert "SESSION_IDLE_MINUTES and SESSION_MAX_AGE_HOURS must be 0 (off) or more" in result.stderr
    assert load_settings(SESSION_MAX_AGE_HOURS="8").returncode == 0


@pytest.mark.django_db(transaction=True)
def test_the_live_socket_closes_when_the_session_ends(cast, settings):
    """The websocket is not activity: a socket opened on an ended session is closed with
    4401 (the page reloads onto the sign-in page), and an open one is closed at its next poll
    once the session ends."""
    from consortium.asgi import application

    settings.LIVE_POLL_SECONDS = 0.2
    settings.SESSION_IDLE_MINUTES = 30
    job = make_scene(cast).propose()
    path = f"/ws/consortia/{cast.consortium.slug}/jobs/{job.pk}/"
    client = _signed_in(cast)
    name = django_settings.SESSION_COOKIE_NAME
    cookie = f"{name}={client.cookies[name].value}"
    headers = [(b"cookie", cookie.encode()), (b"origin", b"http://localhost")]

    async def go():
        socket = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await socket.connect(timeout=20)
        assert connected
        first = await socket.receive_json_from(timeout=20)
        assert first["type"] == "state"
        await sync_to_async(_age)(client, idle_minutes=31)
        closed = await socket.receive_output(timeout=20)
        assert closed == {"type": "websocket.close", "code": SIGNED_OUT}
        await socket.disconnect()
        # A new socket on the same (ended) session: accepted, then closed with the same code.
        again = WebsocketCommunicator(application, path, headers=headers)
        connected, _ = await again.connect(timeout=20)
        assert connected
        closed = await again.receive_output(timeout=20)
        assert closed == {"type": "websocket.close", "code": SIGNED_OUT}
        await again.disconnect()

    asyncio.run(go())
