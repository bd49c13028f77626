"""The one-time token is copied with a button (issue 14): an institution's administrator creates
worker credentials, clicks "Copy the token", and the clipboard holds exactly the token the page
shows once. Pytest-django's live server and Playwright on Debian's chromium, as
tests/web/test_browser_dashboard.py."""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from tests.support.browser import launch, session_cookie, shot, wait_for_expression, watch_errors
from tests.support.keys import ed25519_pem

pytestmark = [pytest.mark.browser]


def test_the_token_shown_once_is_copied_by_its_button(cast, live_server):
    from playwright.sync_api import sync_playwright

    url = reverse("training:credential-list", args=[cast.consortium.slug, cast.hospital_a.slug])
    cookie = session_cookie(cast.inst_admin, live_server.url)
    public_key = ed25519_pem()
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            context = browser.new_context(
                viewport={"width": 390, "height": 844}, base_url=live_server.url
            )
            context.grant_permissions(["clipboard-read", "clipboard-write"])
            context.add_cookies([cookie])
            page = context.new_page()
            watch_errors(page, errors)  # script errors and CSP violations
            page.goto(url)
            page.get_by_label("Label").fill("gpu-node-1")
            page.get_by_label("Worker public key (PEM)").fill(public_key)
            page.get_by_role("button", name="Create credentials").click()
            page.wait_for_load_state()
            settings_text = page.locator("#worker-env").inner_text()
            token = re.search(r"SITE_TOKEN=(\S+)", settings_text).group(1)
            page.get_by_role("button", name="Copy the token").click()
            wait_for_expression(
                page, "document.getElementById('copy-status').textContent === 'Copied.'"
            )
            assert page.evaluate("navigator.clipboard.readText()") == token
            page.get_by_role("button", name="Copy all the settings").click()
            copied = page.evaluate("navigator.clipboard.readText()")
            assert f"SITE_TOKEN={token}" in copied and "CENTRAL_URL=" in copied
            assert page.evaluate("document.documentElement.scrollWidth") <= 391
            shot(page, "copy-token-390")
        finally:
            browser.close()
    assert errors == []
