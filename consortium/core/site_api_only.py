"""The site API's own server (``SITE_API_ONLY=true``, docs/deploy/systemd/fl-site-api.service).

The hospitals' workers call ``/api/site/`` with a site token and nothing else: no session, no
CSRF token (the endpoints take no cookie), no second factor, no sign-in to lock out, no static
file. So the server that answers them runs the same code with a short middleware stack
(settings: the request's latency for ``/metrics``, the API's JSON errors, the security headers)
instead of the dozen a person's pages need; the site's requests are the centre's bulk at scale,
and each middleware costs every one of them (measured: about a quarter of a small site request's
time, docs/performance.md, "Scale").

Without sessions the pages could not work there, and they must not be half-served: this
middleware, first in that stack, answers every other path with 404 in the API's error shape,
saying where the path is served. ``/health/`` and ``/metrics`` stay, for whoever watches this
server itself.
"""

from __future__ import annotations

from django.http import JsonResponse

__all__ = ["SITE_API_ONLY_PATHS", "SiteAPIOnlyMiddleware"]

#: What the site API's server answers: the site API, and its own health and metrics.
SITE_API_ONLY_PATHS = ("/api/site/", "/health/", "/metrics")


class SiteAPIOnlyMiddleware:
    """404 for every path the site API's server does not serve (it has no sessions)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if request.path.startswith(SITE_API_ONLY_PATHS):
            return self.get_response(request)
        return JsonResponse(
            {
                "detail": (
                    f"{request.path} is not served here: this server answers the site API "
                    "(/api/site/) only; the pages and the rest of the API are on the web server"
                ),
                "code": "not_found",
            },
            status=404,
        )
