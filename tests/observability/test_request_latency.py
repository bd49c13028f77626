"""The request latency histogram: every request timed, labelled by route name, never by path."""

from __future__ import annotations

import asyncio

import pytest
from django.http import HttpResponse
from django.test import Client, RequestFactory
from django.urls import resolve

from consortium.observability.middleware import REQUEST_LATENCY, RequestLatencyMiddleware
from tests.observability.scraping import parse, series
from tests.support.factories import UserFactory


def _count(route: str, method: str = "GET", status: str | None = None) -> float:
    total = 0.0
    for family in REQUEST_LATENCY.collect():
        for sample in family.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_count")
                and labels["route"] == route
                and labels["method"] == method
                and (status is None or labels["status"] == status)
            ):
                total += sample.value
    return total


def test_requests_are_timed_by_route_name_with_no_ids(cast):
    client = cast.client_for("researcher")
    slug = cast.consortium.slug
    before_detail = _count("training:job-detail", status="4xx")
    before_list = _count("training:job-list", status="2xx")
    before_unmatched = _count("unmatched", status="4xx")

    assert client.get(f"/consortia/{slug}/jobs/").status_code == 200
    assert client.get(f"/consortia/{slug}/jobs/987654/").status_code == 404
    assert client.get("/no/such/page/31337/").status_code == 404

    assert _count("training:job-list", status="2xx") == before_list + 1
    assert _count("training:job-detail", status="4xx") == before_detail + 1
    assert _count("unmatched", status="4xx") == before_unmatched + 1

    staff = Client()
    staff.force_login(UserFactory(username="ops", is_staff=True))
    samples = parse(staff.get("/metrics").content.decode())
    routes = {
        dict(labels)["route"]
        for labels in series(samples, "fl_http_request_duration_seconds_count")
    }
    assert "training:job-detail" in routes
    for route in routes:  # the paths' ids and slugs never become labels
        assert "987654" not in route and "31337" not in route and slug not in route


def test_an_odd_method_is_one_label():
    request = RequestFactory().generic("PROPFIND", "/health/")
    request.resolver_match = resolve("/health/")
    before = _count("health", method="other")
    RequestLatencyMiddleware(lambda r: HttpResponse(status=405))(request)
    assert _count("health", method="other") == before + 1


def test_the_async_path_times_too():
    async def view(request):
        await asyncio.sleep(0.02)
        return HttpResponse("ok")

    middleware = RequestLatencyMiddleware(view)
    assert asyncio.iscoroutinefunction(middleware)
    request = RequestFactory().get("/health/")
    request.resolver_match = resolve("/health/")
    before = _count("health", status="2xx")
    response = asyncio.run(middleware(request))
    assert response.status_code == 200
    assert _count("health", status="2xx") == before + 1


def test_a_view_that_raises_is_counted_as_a_server_error():
    request = RequestFactory().get("/health/")
    request.resolver_match = resolve("/health/")
    before = _count("health", status="5xx")

    def broken(request):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        RequestLatencyMiddleware(broken)(request)
    assert _count("health", status="5xx") == before + 1
