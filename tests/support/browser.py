"""What the page-level browser tests share: where chromium is, where screenshots go, a
signed-in session as a cookie, and a chromium launched the way this machine needs it.

Those tests use pytest-django's ``live_server`` and Playwright's sync API. Django refuses the
ORM inside Playwright's event loop, so everything from the database (the cookie included) is
made before the browser starts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client

CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = Path(
    os.environ.get(
        "BROWSER_ARTIFACTS", Path(settings.BASE_DIR) / "var" / "test-artifacts" / "browser"
    )
)
#: Without the last flag chromium keeps trying to reach the network (none here).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def require_chromium() -> None:
    """Fail (not skip) when the browser is missing: the journeys must run, not vanish."""
    if not Path(CHROMIUM).exists():
        pytest.fail(
            f"the browser tests need Debian's chromium at {CHROMIUM} "
            "(apt-get install -y chromium), or CHROMIUM_PATH"
        )


def session_cookie(user, base_url: str) -> dict:
    """A signed-in session for ``user``, as a browser cookie."""
    client = Client()
    client.force_login(user)
    return {
        "name": settings.SESSION_COOKIE_NAME,
        "value": client.cookies[settings.SESSION_COOKIE_NAME].value,
        "url": base_url,
    }


def launch(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def shot(page, name: str) -> None:
    """A full-page screenshot under ``ARTIFACTS`` (to look at before stopping)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def fits(page, width: int) -> None:
    """Nothing makes the page wider than the window (wide tables scroll in their own box)."""
    assert page.evaluate("document.documentElement.scrollWidth") <= width


def signed_in_page(browser, *, base_url: str, cookie: dict, errors: list, width: int = 1280):
    """A page at ``width`` px signed in with ``cookie``; its script errors go to ``errors``
    (a journey asserts there were none)."""
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=base_url)
    context.add_cookies([cookie])
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page
