"""Request latency, for ``/metrics``: a Prometheus histogram of every HTTP request's duration.

Labelled by the *route* (the resolved URL's ``namespace:name``, or its pattern when it has no
name; ``unmatched`` for a path that resolves to nothing, a 404 or a redirect before any view),
the method (the usual seven, any other is ``other``) and the status class (``2xx``...). Never
by the raw path: a path holds job, round and site ids, and every distinct label value is a
time series Prometheus keeps; routes are a fixed set.

Per process: each web process counts its own requests, since the histogram lives in its
memory. Under one Daphne process (docs/deploy/) that is the whole server; with several,
Prometheus scrapes each (or sums what a proxy's scrape of each returns), and a restart starts
the counts again, which ``rate()`` and ``histogram_quantile()`` take in their stride. It is
registered on no global registry: ``consortium.observability.metrics`` adds it to its own.

The middleware is first in ``MIDDLEWARE`` (settings), so the time includes every other
middleware: what a client waits for, less the proxy (for a streamed answer, a model's
download, until its first bytes are ready, not until the last is sent). It runs as sync or
async, whichever the handler calls it as, so it adds no thread switch under Daphne.
"""

from __future__ import annotations

import time

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from prometheus_client import Histogram

__all__ = ["REQUEST_LATENCY", "RequestLatencyMiddleware", "route_of"]

#: Seconds; from a health probe's few milliseconds to a 200 MB update's upload.
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

REQUEST_LATENCY = Histogram(
    "fl_http_request_duration_seconds",
    "Seconds to answer an HTTP request, by route name (never the raw path), method and "
    "status class; counted per web process since it started.",
    ("route", "method", "status"),
    buckets=BUCKETS,
    registry=None,
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def route_of(request) -> str:
    """The request's route as a bounded label: ``namespace:name``, else the URL pattern."""
    match = getattr(request, "resolver_match", None)
    if match is None:
        return "unmatched"
    if match.url_name:
        return match.view_name
    return match.route or "unnamed"


def _observe(request, response, started: float) -> None:
    method = request.method if request.method in _METHODS else "other"
    status = f"{response.status_code // 100}xx" if response is not None else "5xx"
    REQUEST_LATENCY.labels(route_of(request), method, status).observe(time.perf_counter() - started)


class RequestLatencyMiddleware:
    """Times each request into :data:`REQUEST_LATENCY` (see the module's docstring)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        started = time.perf_counter()
        response = None
        try:
            response = self.get_response(request)
            return response
        finally:
            _observe(request, response, started)

    async def __acall__(self, request):
        started = time.perf_counter()
        response = None
        try:
            response = await self.get_response(request)
            return response
        finally:
            _observe(request, response, started)
