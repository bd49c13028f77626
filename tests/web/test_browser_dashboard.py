"""The consortium dashboard's institutions table in a real browser (issue 14, defect 2).

The table's block is swapped in place by htmx for its search, sort and paging. Its links to a
hospital's page used to be boosted too: the click changed the address bar but swapped in the
table of a page that has none, so the dashboard lost its table and stayed. Here the
administrator clicks a hospital's name and must land on the hospital's page, and the table's
search must still swap in place (no page load: a marker set on ``window`` survives).

Unlike ``tests/web/test_browser.py`` (the whole demo stack), this needs no worker: the test's
own live server (pytest-django's ``live_server``) over the ``cast`` consortium, and Playwright
driving Debian's chromium (``/usr/bin/chromium``, or ``CHROMIUM_PATH``). Screenshots go under
``BROWSER_ARTIFACTS`` (default ``var/test-artifacts/browser``).
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.support.browser import launch, require_chromium, watch_errors
from tests.support.browser import session_cookie as _session_cookie
from tests.support.browser import shot as _shot

pytestmark = [pytest.mark.browser]


def test_a_hospital_name_on_the_dashboard_opens_the_hospitals_page(cast, live_server):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    dashboard = reverse("consortium:consortium-detail", args=[cast.consortium.slug])
    hospital_a = reverse(
        "consortium:institution-detail", args=[cast.consortium.slug, cast.hospital_a.slug]
    )
    cookie = _session_cookie(cast.admin, live_server.url)
    errors: list[str] = []

    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(
                viewport={"width": 1280, "height": 900}, base_url=live_server.url
            )
            context.add_cookies([cookie])
            page = context.new_page()
            page.set_default_timeout(30_000)
            watch_errors(page, errors)  # script errors and CSP violations
            table = page.locator("#institutions")

            # The table's search swaps the table in place: no page load, the URL says the query.
            page.goto(dashboard)
            expect(table).to_be_visible()
            page.evaluate("window.__stillTheSamePage = true")
            page.get_by_label("Find an institution").fill("Hospital B")
            page.get_by_role("button", name="Find").click()
            expect(page).to_have_url(re.compile(r"[?&]q=Hospital(\+|%20)B"))
            expect(table.get_by_role("link", name="Hospital A")).to_have_count(0)
            expect(table.get_by_role("link", name="Hospital B")).to_be_visible()
            assert page.evaluate("window.__stillTheSamePage === true"), "the search reloaded"
            expect(page.get_by_role("heading", level=1)).to_have_text(cast.consortium.name)
            _shot(page, "dashboard-institutions-search")

            # A hospital's name opens the hospital's page.
            page.goto(dashboard)
            expect(table).to_be_visible()
            table.get_by_role("link", name="Hospital A").click()
            expect(page).to_have_url(re.compile(re.escape(hospital_a) + "$"))
            expect(page.get_by_role("heading", level=1)).to_have_text("Hospital A")
            expect(page.get_by_text("Worker signing keys")).to_be_visible()
            _shot(page, "dashboard-hospital-link")
        finally:
            browser.close()
    assert not errors, errors
