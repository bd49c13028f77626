"""The app's own error pages (404, 403, 400, 500 and a refused CSRF check), in its layout and
with a way back, also while ``DEBUG`` is on.

Without ``DEBUG``, Django renders ``404.html``, ``403.html``, ``400.html`` and ``500.html``
from ``templates/`` by itself. With ``DEBUG`` on (the development default, and the demo's),
Django answers a missing page or a crash with its technical page instead: the URL patterns,
the settings and a traceback, shown to whoever asked, including the demo's outsider. So
:class:`AppErrorPagesMiddleware` swaps a technical 404 or 500 page for the app's one, unless the
operator asks for the technical pages (``DJANGO_TECHNICAL_ERROR_PAGES=true``, for a developer
at their own machine; the traceback is in the server's log either way, as Django logs it
before rendering).

A technical page is recognised by the ``robots`` meta tag Django's debug templates carry and
ours do not; answers that are not HTML (the API's JSON errors) are left alone.

Under ``/api/`` an error page is never HTML: a URL no route matches (``/api/jobs/0.5/``), a crash
outside a view, a refused host, answer in the API's error shape (``{"detail", "code"}``, the
content type the OpenAPI schema declares), with or without ``DEBUG``. A client that parses
JSON gets JSON for every status the schema lists.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.shortcuts import render
from django.template.loader import render_to_string

__all__ = ["API_PREFIX", "AppErrorPagesMiddleware", "csrf_failure"]

#: Where the JSON API lives (consortium.api_urls): its errors are JSON, never a page.
API_PREFIX = "/api/"

#: The body an API error that no view wrote gets, by status.
_API_ERRORS = {
    400: ("Bad request.", "bad_request"),
    403: ("You do not have permission to perform this action.", "permission_denied"),
    404: ("Not found.", "not_found"),
    500: ("Server error: the request was not completed; the server's log says why.", "error"),
}

#: What Django's technical 404 and 500 pages (django/views/templates/technical_*.html) carry.
_TECHNICAL_MARK = b'<meta name="robots" content="NONE,NOARCHIVE">'


def csrf_failure(request, reason: str = ""):
    """``CSRF_FAILURE_VIEW``: a refused form post, in words, in the app's layout (Django's
    own page speaks of referers and cookies to a nurse who only left a form open too long)."""
    return render(request, "403_csrf.html", {"reason": reason}, status=403)


class AppErrorPagesMiddleware:
    """Replace Django's technical 404/500 pages (``DEBUG`` on) with the app's own."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        if request.path.startswith(API_PREFIX):
            return self._api_error(response)
        if not settings.DEBUG or getattr(settings, "TECHNICAL_ERROR_PAGES", False):
            return response
        if response.status_code not in (404, 500) or not self._technical(response):
            return response
        template = f"{response.status_code}.html"
        if response.status_code == 500:
            # As Django's server_error: no request context (the failure may lie there).
            body = render_to_string(template)
        else:
            # The same page for a missing and a forbidden object: nothing of the request in it.
            body = render_to_string(template, request=request)
        response.content = body.encode()
        response["Content-Length"] = str(len(response.content))
        return response

    @staticmethod
    def _api_error(response):
        """An HTML error answer under ``/api/`` made JSON, its status and headers kept."""
        error = _API_ERRORS.get(response.status_code)
        if error is None or getattr(response, "streaming", False):
            return response
        if not response.get("Content-Type", "").startswith("text/html"):
            return response
        detail, code = error
        response.content = json.dumps({"detail": detail, "code": code}).encode()
        response["Content-Type"] = "application/json"
        response["Content-Length"] = str(len(response.content))
        return response

    @staticmethod
    def _technical(response) -> bool:
        if getattr(response, "streaming", False):
            return False
        if not response.get("Content-Type", "").startswith("text/html"):
            return False
        return _TECHNICAL_MARK in response.content[:4096]
