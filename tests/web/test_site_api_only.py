"""The site API's own server (``SITE_API_ONLY=true``, fl-site-api.service): the short middleware
stack answers the sites as the full one does, refuses every other path, and keeps its health
check and metrics for its operators.

The middleware list is the one the settings build (read in a fresh interpreter with the
variable set), put in place here with ``override_settings``; the deploy test runs the unit
itself behind nginx.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.test import Client, override_settings

from tests.rounds.test_site_api import round_model, world  # noqa: F401 - the fixture

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parents[2]


def _middleware(**env) -> list[str]:
    code = "import json, consortium.settings as s; print(json.dumps(s.MIDDLEWARE))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def site_api_middleware() -> list[str]:
    return _middleware(SITE_API_ONLY="true")


def test_the_site_api_server_runs_a_short_stack_and_the_web_server_the_whole_one(
    site_api_middleware,
):
    full = _middleware(SITE_API_ONLY="false")
    assert site_api_middleware == [
        "consortium.observability.middleware.RequestLatencyMiddleware",
        "consortium.core.site_api_only.SiteAPIOnlyMiddleware",
        "consortium.core.error_pages.AppErrorPagesMiddleware",
        "consortium.core.security_headers.SecurityHeadersMiddleware",
        "django.middleware.security.SecurityMiddleware",
    ]
    assert "django.contrib.sessions.middleware.SessionMiddleware" in full
    assert "axes.middleware.AxesMiddleware" in full
    assert "consortium.core.site_api_only.SiteAPIOnlyMiddleware" not in full


def test_a_site_is_served_the_same_under_the_short_stack(world, site_api_middleware):  # noqa: F811
    whole = round_model(world)
    with override_settings(MIDDLEWARE=site_api_middleware):
        short = round_model(world)
        refused = Client().get(
            f"/api/site/v1/jobs/{world.job.pk}/rounds/1/model/",
            HTTP_AUTHORIZATION="Site fls_not-a-real-token",
            HTTP_X_SITE_PROTOCOL="1",
        )
    assert whole.status_code == short.status_code == 200
    assert short.content == whole.content
    assert short["X-Content-SHA256"] == whole["X-Content-SHA256"] == world.model.digest
    # The security headers are the short stack's too.
    assert short["X-Content-Type-Options"] == "nosniff"
    assert refused.status_code == 401
    assert refused.json()["detail"] == "Invalid site token."


@pytest.mark.parametrize("path", ["/accounts/login/", "/consortia/", "/api/jobs/", "/admin/"])
def test_every_other_path_is_refused_saying_where_it_is_served(path, site_api_middleware):
    with override_settings(MIDDLEWARE=site_api_middleware):
        response = Client().get(path)
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == "not_found"
    assert "site API (/api/site/) only" in body["detail"]


def test_health_and_metrics_stay_for_the_servers_operators(site_api_middleware, settings):
    settings.METRICS_TOKEN = "m" * 40
    with override_settings(MIDDLEWARE=site_api_middleware):
        health = Client().get("/health/?scope=web")
        anonymous = Client().get("/metrics")
        scraped = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer " + "m" * 40)
    assert health.status_code == 200, health.content
    # No session there: only the bearer token reads the metrics, and nothing crashes.
    assert anonymous.status_code == 401
    assert scraped.status_code == 200
    assert b"fl_http_request_duration_seconds" in scraped.content
