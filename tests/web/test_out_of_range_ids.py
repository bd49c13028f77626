"""Ids beyond what the database holds are refused before any query (issue 16, item 6): a path
id of more than 18 digits is no URL (404), and a query parameter naming an id must be a whole
number the database can hold (400, saying so). Both once reached the ORM and failed there with
an overflowing integer, a 500 (consortium/core/converters.py)."""

from __future__ import annotations

import pytest
from django.urls import reverse

from tests.rounds import test_site_api as site_api
from tests.support.fl_harness import use_artifact_folder

HUGE = "99999999999999999999999"  # 23 digits: beyond 2^63


@pytest.fixture
def world(cast, settings, tmp_path):
    """A running job and a site worker's credentials (tests/rounds/test_site_api.py's)."""
    use_artifact_folder(settings, tmp_path / "artifacts")
    scene = site_api.make_scene(cast)
    job, _model, _round = site_api.start_job(scene)
    return site_api.World(
        cast=cast,
        scene=scene,
        job=job,
        model=_model,
        round=_round,
        site=site_api.make_site(cast),
    )


@pytest.mark.parametrize(
    "path",
    [
        "jobs/{huge}/",
        "jobs/{huge}/rounds/1/model/",
        "jobs/{job}/rounds/{huge}/model/",
        "jobs/{huge}/audit/",
        "jobs/{huge}/rounds/1/evaluation/",
    ],
)
def test_the_site_api_answers_404_for_an_id_the_database_cannot_hold(world, path):
    url = "/api/site/v1/" + path.format(huge=HUGE, job=world.job.pk)
    response = world.site.client().get(url)
    assert response.status_code == 404, (url, response.content[:200])


def test_an_upload_to_an_out_of_range_job_is_a_404_not_a_500(world):
    response = world.site.client().put(
        f"/api/site/v1/jobs/{HUGE}/rounds/1/update/",
        data=b"\x00" * 16,
        content_type="application/octet-stream",
    )
    assert response.status_code == 404


def test_the_largest_id_the_database_holds_still_routes(world):
    """18 digits is a URL (a job that does not exist: 404 from the view, not the router)."""
    response = world.site.client().get(f"/api/site/v1/jobs/{'9' * 18}/")
    assert response.status_code == 404
    assert reverse("training:job-detail", kwargs={"slug": "c", "pk": 12}).endswith("/jobs/12/")


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("agreement=-1.6e46", "whole number"),
        ("agreement=99999999999999999999", "less than or equal to"),
        ("agreement=0", "greater than or equal to 1"),
    ],
)
def test_an_id_filter_outside_the_databases_range_is_a_400_that_says_so(
    cast, client, query, fragment
):
    client.force_login(cast.admin)
    response = client.get(f"/api/agreement-versions/?{query}")
    assert response.status_code == 400, response.content[:300]
    assert fragment in str(response.json()["agreement"])


def test_an_in_range_id_filter_still_filters(cast, client):
    client.force_login(cast.admin)
    assert client.get("/api/agreement-versions/?agreement=1").status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/api/agreement-versions/{huge}/",
        "/api/jobs/{huge}/",
        "/consortia/{slug}/jobs/{huge}/",
        "/consortia/{slug}/agreements/{huge}/",
        "/consortia/{slug}/jobs/{huge}/report/",
    ],
)
def test_pages_and_api_answer_404_for_an_id_the_database_cannot_hold(cast, client, path):
    client.force_login(cast.admin)
    response = client.get(path.format(huge=HUGE, slug=cast.consortium.slug))
    assert response.status_code == 404
