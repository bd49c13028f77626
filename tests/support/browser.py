"""What the page-level browser tests share: where chromium is, where screenshots go, a
signed-in session as a cookie, and a chromium launched the way this machine needs it.

Those tests use pytest-django's ``live_server`` and Playwright's sync API. Django refuses the
ORM inside Playwright's event loop, so everything from the database (the cookie included) is
made before the browser starts.
"""

from __future__ import annotations

import os
import time
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


#: Reports each CSP violation on the console, so the watch below sees every one, whether or not
#: the browser logs it itself. Playwright injects it past the page's CSP.
_REPORT_VIOLATIONS = """
document.addEventListener("securitypolicyviolation", (event) => {
  console.error(`Content Security Policy violation: ${event.violatedDirective} blocked `
    + `${event.blockedURI || "inline code"} at ${event.sourceFile}:${event.lineNumber}`);
});
"""
#: Console messages about the page's policies (a violation, a feature the browser does not know,
#: plotly.js saying it could not add its style rules).
POLICY_WORDS = ("Content Security Policy", "Content-Security-Policy", "Permissions-Policy", "CSP")


def watch_errors(page, errors: list) -> None:
    """Script errors and any console message about the page's security policies go to
    ``errors``: a journey that asserts there were none fails on a CSP violation (an inline
    script, handler or style left somewhere, which the browser refuses silently otherwise)."""
    page.add_init_script(_REPORT_VIOLATIONS)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    def console(message) -> None:
        if any(word in message.text for word in POLICY_WORDS):
            errors.append(f"console {message.type}: {message.text}")

    page.on("console", console)


def wait_for_expression(page, expression: str, *, timeout_s: float = 30.0) -> None:
    """Wait until the JavaScript ``expression`` is true on ``page``.

    Instead of Playwright's ``page.wait_for_function``: that polls by ``eval`` inside the page,
    which the site's CSP (no ``'unsafe-eval'``) refuses once the condition is not true at once.
    ``page.evaluate`` runs through the debugging protocol, which the CSP does not govern."""
    deadline = time.monotonic() + timeout_s
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"still not true after {timeout_s} s: {expression}"
        page.wait_for_timeout(100)


def signed_in_page(browser, *, base_url: str, cookie: dict, errors: list, width: int = 1280):
    """A page at ``width`` px signed in with ``cookie``; its script errors and policy
    violations go to ``errors`` (a journey asserts there were none)."""
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=base_url)
    context.add_cookies([cookie])
    page = context.new_page()
    page.set_default_timeout(30_000)
    watch_errors(page, errors)
    return page
