"""What the API answers, in process: the error statuses its schema declares for every
operation, JSON errors for every URL under ``/api/``, and input held to the declared types,
pages and filters (``consortium.core.api``). ``test_api_fuzz.py`` holds the live server to the
same contract with generated requests; these name each rule with a request that breaks it."""

from __future__ import annotations

import re

import pytest
import yaml
from django.core.management import call_command

from consortium.core.api.schema import NOT_BLANK_PATTERN
from tests.support.api_client import api


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    target = tmp_path_factory.mktemp("schema") / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    return yaml.safe_load(target.read_text())


def _operations(schema):
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_every_operation_declares_the_errors_it_can_answer(schema):
    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        where = {p["in"] for p in operation.get("parameters", [])}
        assert {"401", "403"} <= set(responses), (method, path)
        if "requestBody" in operation or "query" in where:
            assert "400" in responses, (method, path)
        if "path" in where or "requestBody" in operation:
            assert "404" in responses, (method, path)
        if method in {"post", "patch", "delete"}:
            assert "409" in responses, (method, path)
        if "requestBody" in operation:
            assert "415" in responses, (method, path)
        for status, response in responses.items():
            if status.startswith(("4", "5")):
                # Every error has a body the client can parse, in the one shape.
                assert "application/json" in response["content"], (method, path, status)


def test_the_error_shape_admits_field_errors_and_the_schema_says_what_text_needs(schema):
    error = schema["components"]["schemas"]["Error"]
    assert error["additionalProperties"] is True
    assert error["properties"]["detail"]["type"] == "string"
    token = schema["components"]["schemas"]["InvitationAcceptRequest"]["properties"]["token"]
    assert token["pattern"] == NOT_BLANK_PATTERN
    fraction = schema["components"]["schemas"]["AgreementCreateRequest"]["properties"][
        "max_shared_fraction"
    ]
    pattern = re.compile(fraction["pattern"])
    assert pattern.search("0.4") and pattern.search(".5")
    assert not pattern.search("") and not pattern.search("-") and not pattern.search(".")
    page = next(
        p for p in schema["paths"]["/api/jobs/"]["get"]["parameters"] if p["name"] == "page"
    )
    assert page["schema"]["minimum"] == 1


@pytest.mark.parametrize(
    "url",
    ["/api/jobs/0.5/", "/api/no-such-thing/", "/api/datasets/1/no-such-action/"],
)
def test_a_url_no_route_matches_answers_json_under_api(cast, url):
    response = api(cast.admin).get(url)
    assert response.status_code == 404
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": "Not found.", "code": "not_found"}


def test_outside_api_a_missing_page_is_still_a_page(cast):
    response = api(cast.admin).get("/no-such-page/")
    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("page", ["", "0", "-1", "x", "last", "1" * 19])
def test_a_page_that_is_not_a_whole_number_from_1_is_a_400(cast, page):
    response = api(cast.admin).get("/api/consortia/", {"page": page})
    assert response.status_code == 400
    assert "page" in response.json()


def test_a_page_past_the_end_is_a_404_and_the_first_is_fine(cast):
    client = api(cast.admin)
    assert client.get("/api/consortia/", {"page": "1"}).status_code == 200
    assert client.get("/api/consortia/", {"page": "99"}).status_code == 404
    twice = client.get("/api/consortia/?page=1&page=1")
    assert twice.status_code == 400


@pytest.mark.parametrize(
    "query",
    ["consortium=", "consortium=%20", "consortium=demo&consortium=demo"],
)
def test_a_filter_given_blank_or_twice_is_a_400_naming_it(cast, query):
    response = api(cast.admin).get(f"/api/institutions/?{query}")
    assert response.status_code == 400
    assert list(response.json()) == ["consortium"]


def test_a_boolean_filter_takes_true_or_false_only(cast):
    client = api(cast.admin)
    assert client.get("/api/validation-sets/", {"current": "true"}).status_code == 200
    refused = client.get("/api/validation-sets/", {"current": "null"})
    assert refused.status_code == 400 and "current" in refused.json()


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", 0), ("country", 12), ("name", True), ("country", ["GB"])],
)
def test_text_sent_as_another_json_type_is_refused(cast, field, value):
    slug = cast.hospital_a.slug
    response = api(cast.admin).patch(f"/api/institutions/{slug}/", {field: value})
    assert response.status_code == 400
    assert response.json() == {field: ["Must be text (a JSON string)."]}


def test_a_number_sent_as_text_is_refused(cast):
    response = api(cast.admin).post("/api/notifications/mark-read/", {"ids": ["1"]})
    assert response.status_code == 400
    assert "whole number" in response.json()["ids"][0]


def test_an_id_beyond_the_database_is_a_400_not_a_server_error(cast):
    response = api(cast.admin).post("/api/notifications/mark-read/", {"ids": [2**63]})
    assert response.status_code == 400


def test_a_form_body_is_a_415_where_the_operation_takes_json(cast):
    response = api(cast.admin).post(
        "/api/notifications/mark-read/", {"ids": "1"}, format="multipart"
    )
    assert response.status_code == 415
    assert response.json()["detail"]
