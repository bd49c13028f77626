"""Content-Security-Policy and Permissions-Policy on every response.

Django 5.2 has no CSP of its own (it arrives in 6.0, which needs Python 3.12), and the one
package that adds it would bring nonces and a settings vocabulary we do not need: every page
of the app loads its scripts and styles from ``/static/`` and passes data to them in
``json_script`` blocks (``type="application/json"``, never executed), so one fixed policy
without ``'unsafe-inline'`` fits all of them. Keeping it that way is a test's job
(``tests/web/test_security_headers.py`` scans the rendered pages for inline scripts, ``on*=``
handlers, ``style=`` attributes and ``javascript:`` links).

The policy comes from ``settings.CONTENT_SECURITY_POLICY`` (directive to sources) and the
permissions from ``settings.PERMISSIONS_POLICY`` (feature to allowed origins, empty for
none). One thing is added per request: the live pages open a websocket to their own host
(``static/js/live.js``), and although CSP Level 3 lets ``'self'`` match ``ws:``/``wss:`` of the
same host, not every browser in use does, so ``connect-src`` names this host's websocket
origin explicitly (the host Django has already validated against ``ALLOWED_HOSTS``).

No page needs another policy today (the API docs, the admin site and the charts work under this
one: ``tests/web/test_browser_policies.py``); a view that truly does sets its own header, which
the middleware leaves alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from django.conf import settings
from django.core.exceptions import DisallowedHost

__all__ = ["SecurityHeadersMiddleware", "permissions_header", "policy_header"]

CSP_HEADER = "Content-Security-Policy"
PERMISSIONS_HEADER = "Permissions-Policy"


def policy_header(policy: Mapping[str, Sequence[str]], *, extra_connect: str = "") -> str:
    """``{"default-src": ["'self'"], ...}`` as a header value; ``extra_connect`` is appended
    to ``connect-src`` (the request's websocket origin)."""
    parts = []
    for directive, sources in policy.items():
        values = list(sources)
        if directive == "connect-src" and extra_connect:
            values.append(extra_connect)
        parts.append(" ".join([directive, *values]))
    return "; ".join(parts)


def permissions_header(policy: Mapping[str, Sequence[str]]) -> str:
    """``{"camera": [], "fullscreen": ["self"]}`` as ``camera=(), fullscreen=(self)``."""
    return ", ".join(f"{feature}=({' '.join(origins)})" for feature, origins in policy.items())


def _websocket_origin(request) -> str:
    """``wss://host`` (or ``ws://`` over plain HTTP) of this request, or "" when the host is
    not one Django accepts (that request is answered with an error page anyway)."""
    try:
        host = request.get_host()
    except DisallowedHost:
        return ""
    return f"{'wss' if request.is_secure() else 'ws'}://{host}"


class SecurityHeadersMiddleware:
    """Adds both headers to every response that does not carry its own (see the module)."""

    def __init__(self, get_response: Callable):
        self.get_response = get_response
        self.permissions = permissions_header(settings.PERMISSIONS_POLICY)

    def __call__(self, request):
        response = self.get_response(request)
        if CSP_HEADER not in response.headers:
            response.headers[CSP_HEADER] = policy_header(
                settings.CONTENT_SECURITY_POLICY, extra_connect=_websocket_origin(request)
            )
        if self.permissions and PERMISSIONS_HEADER not in response.headers:
            response.headers[PERMISSIONS_HEADER] = self.permissions
        return response
