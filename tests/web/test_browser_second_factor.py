"""Setting up the second factor in a browser, at a phone's width (issue 16, "No second factor"):
"Two-factor" in the account menu, the setup page's QR code and secret, a code typed from the
secret as an authenticator app computes it, and the backup codes shown once; no page breaks
the Content Security Policy. Pytest-django's live server and Playwright on Debian's chromium,
as tests/web/test_browser_accounts.py."""

from __future__ import annotations

import base64
import time

import pytest
from django_otp.oath import TOTP
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from tests.support.browser import (
    fits,
    launch,
    require_chromium,
    session_cookie,
    shot,
    signed_in_page,
)

pytestmark = [pytest.mark.browser]


def code_from_secret(secret: str) -> str:
    """What an authenticator app shows now for the base32 ``secret`` (RFC 6238 defaults)."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    totp = TOTP(key)
    totp.time = time.time()
    return f"{totp.token():06d}"


def test_enrol_an_authenticator_on_a_phone(cast, live_server, settings):
    from playwright.sync_api import sync_playwright

    require_chromium()
    settings.TWO_FACTOR_REQUIRED = True
    cookie = session_cookie(cast.approver, live_server.url)
    errors: list[str] = []
    with sync_playwright() as p:
        browser = launch(p)
        try:
            page = signed_in_page(
                browser, base_url=live_server.url, cookie=cookie, errors=errors, width=390
            )
            page.goto("/")
            page.get_by_role("link", name="Two-factor").click()
            page.wait_for_load_state()
            assert page.get_by_role("heading", level=1).inner_text() == "Two-factor authentication"
            assert "not set up" in page.locator("main").inner_text()
            page.get_by_role("link", name="Set up an authenticator app").click()
            page.wait_for_load_state()
            qr = page.get_by_role("img", name="QR code of the authenticator secret")
            assert qr.is_visible()
            assert qr.evaluate("img => img.naturalWidth") > 0
            fits(page, 390)
            shot(page, "two-factor-setup-390")
            secret = page.locator("#totp-secret").inner_text().strip()
            page.get_by_label("Code").fill(code_from_secret(secret))
            page.get_by_role("button", name="Confirm").click()
            page.wait_for_load_state()
            assert page.get_by_role("heading", level=1).inner_text() == "Your backup codes"
            shown = page.locator("#backup-codes li").all_inner_texts()
            assert len(shown) == 10
            fits(page, 390)
            shot(page, "two-factor-backup-codes-390")
            page.get_by_role("link", name="I have kept the codes").click()
            page.wait_for_load_state()
            status = page.locator("main").inner_text()
            assert "verified" in status and "not verified" not in status
            assert "set up" in status and "not set up" not in status
        finally:
            browser.close()
    assert errors == []
    assert TOTPDevice.objects.get(user=cast.approver).confirmed
    assert sorted(shown) == sorted(StaticToken.objects.values_list("token", flat=True))
