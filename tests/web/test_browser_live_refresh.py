"""The live job page keeps its server-rendered sections current when the socket alone cannot
say what changed (a CI run once showed a completed job's charts under a heading that still said
"Running").

The page redraws progress and charts from its websocket's messages, and asks the server for its
other sections (the heading's state, decisions, history) through htmx after a change. Three ways
a change could slip by, each driven here in Debian's chromium against pytest-django's
``live_server``, with the websocket played by the test (Playwright's ``route_web_socket``: the
live server speaks no websocket, and the test decides what the socket says and when):

* the job moves on while the socket is down, and the first message after the reconnect carries
  the new state but no entries;
* the socket drops and comes back, with nothing said at all;
* the refresh itself fails (the server busy or restarting): it is tried again until it succeeds.
"""

from __future__ import annotations

import contextlib
import json
import re
import time

import pytest
from django.urls import reverse

from tests.support.browser import (
    launch,
    require_chromium,
    session_cookie,
    signed_in_page,
    wait_for_expression,
)
from tests.support.liveness_fixtures import running_job
from tests.support.training_fixtures import make_scene
from training.jobs.proposals import job_cancel
from training.rounds.waiting import job_page_state

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

SOCKET = re.compile(r".*/ws/consortia/.*")
HEADING_SAYS_CANCELLED = "document.querySelector('#job-heading').innerText.includes('Cancelled')"


@pytest.fixture
def watched(cast, live_server, monkeypatch):
    """A running job, its page's URL, and the researcher's signed-in cookie.

    The test changes the job between browser steps: Playwright's sync API keeps an event loop
    on this thread, where Django otherwise refuses the ORM (nothing here is concurrent)."""
    require_chromium()
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    job = running_job(make_scene(cast))
    url = live_server.url + reverse("training:job-detail", args=[cast.consortium.slug, job.pk])
    return job, url, session_cookie(cast.researcher, live_server.url)


class PlayedSocket:
    """The page's websockets, as the test plays them: every one the page opens is kept, open,
    never connected to the server."""

    def __init__(self, page):
        self.opened = []
        page.route_web_socket(SOCKET, lambda socket: self.opened.append(socket))

    def wait_for(self, count: int, page) -> None:
        deadline = time.monotonic() + 30
        while len(self.opened) < count:
            assert time.monotonic() < deadline, f"the page opened {len(self.opened)} sockets"
            page.wait_for_timeout(100)

    def say(self, job, *, entries: list) -> None:
        state = job_page_state(job)
        self.opened[-1].send(
            json.dumps({"type": "state", "head": 0, "entries": entries, "state": state})
        )


def _refreshes(page) -> list:
    """The page's own background refreshes (the htmx request marked as not the person's)."""
    seen: list = []
    page.on(
        "request",
        lambda request: (
            seen.append(request.url) if request.headers.get("x-background-refresh") else None
        ),
    )
    return seen


def _cancel(job, cast):
    job_cancel(acting_user=cast.admin, job=job, reason="The steering group stopped it.")
    job.refresh_from_db()


@contextlib.contextmanager
def open_job_page(watched, *, route_page=None):
    """The running job's page in chromium, its socket played by the test and open: yields the
    page, its sockets and the background refreshes it sent; no script error or policy
    violation allowed. ``route_page``: a Playwright route handler for the page's own URL."""
    from playwright.sync_api import sync_playwright

    _job, url, cookie = watched
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = signed_in_page(browser, base_url=url, cookie=cookie, errors=errors)
            sockets = PlayedSocket(page)
            refreshes = _refreshes(page)
            if route_page is not None:
                page.route(url, route_page)
            page.goto(url)
            sockets.wait_for(1, page)
            page.wait_for_selector("#live[data-live=open]")
            yield page, sockets, refreshes
        finally:
            browser.close()
    assert not errors, errors


def test_a_new_state_without_entries_refreshes_the_sections(cast, watched):
    job = watched[0]
    with open_job_page(watched) as (page, sockets, refreshes):
        assert "Running" in page.locator("#job-heading").inner_text()

        # The same state again, no entries: nothing to fetch.
        sockets.say(job, entries=[])
        page.wait_for_timeout(1500)
        assert refreshes == []

        # The job was cancelled while the socket was down: the message after the reconnect
        # has the new state and no entries (what was written meanwhile is not replayed).
        _cancel(job, cast)
        sockets.say(job, entries=[])
        wait_for_expression(page, HEADING_SAYS_CANCELLED, timeout_s=15)
        assert page.locator("#live").get_attribute("data-job-state") == "cancelled"
        assert len(refreshes) == 1, refreshes


def test_a_socket_that_comes_back_refreshes_the_sections(cast, watched):
    job = watched[0]
    with open_job_page(watched) as (page, sockets, refreshes):
        # The job changes and the socket drops before saying anything; the page reconnects
        # and asks for its sections without waiting for a message.
        _cancel(job, cast)
        sockets.opened[-1].close(code=1011, reason="server restarting")
        sockets.wait_for(2, page)
        wait_for_expression(page, HEADING_SAYS_CANCELLED, timeout_s=15)
        assert len(refreshes) == 1, refreshes


def test_a_failed_refresh_is_tried_again_until_it_succeeds(cast, watched):
    job = watched[0]
    failed: list[str] = []

    def busy_twice(route):
        """The first two refreshes meet a server that cannot answer (503, then no answer)."""
        if not route.request.headers.get("x-background-refresh") or len(failed) >= 2:
            route.continue_()
        elif not failed:
            failed.append("503")
            route.fulfill(status=503, body="busy")
        else:
            failed.append("aborted")
            route.abort("connectionreset")

    with open_job_page(watched, route_page=busy_twice) as (page, sockets, refreshes):
        _cancel(job, cast)
        entry = {"event": "job.state_changed", "time_text": "now", "words": "cancelled"}
        sockets.say(job, entries=[entry])
        wait_for_expression(page, HEADING_SAYS_CANCELLED, timeout_s=20)
        assert failed == ["503", "aborted"]
        assert len(refreshes) == 3, refreshes
