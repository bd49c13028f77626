"""The strict Content-Security-Policy in a real browser: the pages that are not covered by the
journeys (the API docs, the admin site, an error page's way back) work under it with no
violation, and the watch the journeys rely on (``tests.support.browser.watch_errors``) does
see a violation when there is one."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.support.browser import (
    launch,
    require_chromium,
    session_cookie,
    shot,
    signed_in_page,
    watch_errors,
)

pytestmark = [pytest.mark.browser]


def test_docs_admin_and_error_pages_work_under_the_policy(cast, live_server, django_user_model):
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    root = django_user_model.objects.create_superuser("root", "root@example.org", "x" * 12)
    cookie = session_cookie(root, live_server.url)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = signed_in_page(browser, base_url=live_server.url, cookie=cookie, errors=errors)

            # Swagger UI draws the schema (its start-up script is loaded, not inline).
            page.goto("/api/docs/")
            expect(page.locator(".swagger-ui .info .title")).to_contain_text("FL Consortium API")
            expect(page.locator(".opblock").first).to_be_visible()
            shot(page, "policy-api-docs")

            # The admin site: a list and a change form with its widgets.
            page.goto("/admin/auth/user/")
            expect(page.locator("#result_list")).to_be_visible()
            page.goto(f"/admin/auth/user/{root.pk}/change/")
            expect(page.locator("#user_form")).to_be_visible()
            shot(page, "policy-admin-change")

            # An error page's "Back" button (was a javascript: link) goes back.
            overview = reverse("consortium:overview")
            page.goto(overview)
            page.goto("/no-such-page/")
            back = page.get_by_role("button", name="Back to the previous page")
            expect(back).to_be_visible()
            back.click()
            expect(page).to_have_url(re.compile(re.escape(overview) + "$"))
        finally:
            browser.close()
    assert errors == [], errors


def test_the_watch_sees_a_violation(cast, live_server):
    """Inline code put into a page is refused by the browser, and reported."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(base_url=live_server.url)
            page = context.new_page()
            watch_errors(page, errors)
            page.goto(reverse("login"))
            ran = page.evaluate(
                """() => new Promise((done) => {
                  const script = document.createElement("script");
                  script.textContent = "window.__inlineRan = true";
                  document.body.append(script);
                  const div = document.createElement("div");
                  div.innerHTML = '<p style="color: red">styled</p>';
                  document.body.append(div);
                  setTimeout(() => done(window.__inlineRan === true), 300);
                })"""
            )
        finally:
            browser.close()
    assert ran is False
    assert any("script-src" in e for e in errors), errors
    assert any("style-src" in e for e in errors), errors
