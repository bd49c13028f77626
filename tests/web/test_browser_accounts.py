"""The account pages in a browser, at a phone's width (issue 16, items 5 and 8): "Forgot your
password?" on the sign-in page, the lock page after too many wrong passwords (what is locked,
until when, the way out), and "Change password" in the top bar; no page breaks the Content
Security Policy. Pytest-django's live server and Playwright on Debian's chromium, as
tests/web/test_browser_copy.py."""

from __future__ import annotations

import pytest

from tests.support.browser import (
    fits,
    launch,
    require_chromium,
    session_cookie,
    shot,
    signed_in_page,
    watch_errors,
)

pytestmark = [pytest.mark.browser]


def test_forgot_locked_and_change_password_pages_on_a_phone(cast, live_server, settings):
    from playwright.sync_api import sync_playwright

    require_chromium()
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 3
    cookie = session_cookie(cast.auditor, live_server.url)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, base_url=live_server.url
            )
            page = context.new_page()
            watch_errors(page, errors)
            page.goto("/accounts/login/")
            assert page.get_by_role("link", name="Forgot your password?").is_visible()
            for _ in range(3):
                page.get_by_label("Username").fill("approver")
                page.get_by_label("Password").fill("not-the-password")
                page.get_by_role("button", name="Sign in").click()
                page.wait_for_load_state()
            heading = page.get_by_role("heading", level=1).inner_text()
            assert heading == "Sign-in locked for now"
            assert "so it is locked until" in page.locator("main").inner_text()
            assert page.get_by_role("link", name="Reset your password by email").is_visible()
            fits(page, 390)
            shot(page, "accounts-locked-390")

            page = signed_in_page(
                browser, base_url=live_server.url, cookie=cookie, errors=errors, width=390
            )
            page.goto("/")
            link = page.get_by_role("link", name="Change password")
            box = link.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 391
            link.click()
            page.wait_for_load_state()
            assert page.get_by_role("heading", level=1).inner_text() == "Change your password"
            fits(page, 390)
            shot(page, "accounts-change-password-390")
        finally:
            browser.close()
    assert errors == []
