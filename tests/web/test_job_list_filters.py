"""The jobs list filtered by participant institution and by state (issue 14).

The filters are GET parameters: they narrow what the user may see and never widen it, the
participant choices are only the institutions of this consortium's jobs, the pager keeps the
filters, and a value the page cannot use (an unknown state, an institution of another
consortium, a typo) is said in words while the list shows what it can, instead of a 500 or a
silently ignored filter.
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

from consortium.governance.services.institutions import consortium_create, institution_create
from tests.support.factories import MembershipFactory, UserFactory
from tests.support.planted_jobs import plant_job
from training.models import JobState


def list_url(consortium) -> str:
    return reverse("training:job-list", args=[consortium.slug])


def titles(response) -> list[str]:
    """The job titles in the list's table, in order."""
    table = response.content.decode().split('<table id="jobs">', 1)[1].split("</table>", 1)[0]
    return re.findall(r'/jobs/\d+/">([^<]+)</a>', table)


def options(response, name: str) -> list[str]:
    """The values a filter's select offers."""
    html = response.content.decode()
    select = re.search(rf'<select name="{name}"[^>]*>(.*?)</select>', html, re.S).group(1)
    return re.findall(r'<option value="([^"]*)"', select)


@pytest.fixture
def jobs(cast):
    a, b = cast.hospital_a, cast.hospital_b
    consortium = cast.consortium
    return {
        "both": plant_job(consortium, title="Both running", institutions=[a, b]),
        "a_only": plant_job(consortium, title="A completed", institutions=[a], state="completed"),
        "b_only": plant_job(consortium, title="B running", institutions=[b]),
        "draft": plant_job(consortium, title="A draft", state=JobState.DRAFT),
    }


@pytest.fixture
def elsewhere(db):
    """Another consortium, with its own hospital and a job: nothing of it may show here."""
    admin = UserFactory(username="elsewhere_admin")
    consortium = consortium_create(acting_user=admin, name="Elsewhere")
    hospital = institution_create(acting_user=admin, consortium=consortium, name="Hospital Z")
    plant_job(consortium, title="Elsewhere job", institutions=[hospital])
    return hospital


def test_the_list_filters_by_participant(cast, jobs):
    client = cast.client_for("auditor")
    response = client.get(list_url(cast.consortium), {"participant": cast.hospital_b.slug})
    assert response.status_code == 200
    assert sorted(titles(response)) == ["B running", "Both running"]
    assert "2 jobs match" in response.content.decode()


def test_the_list_filters_by_participant_and_state_together(cast, jobs):
    client = cast.client_for("researcher")
    url = list_url(cast.consortium)
    assert titles(client.get(url, {"participant": cast.hospital_a.slug, "state": "running"})) == [
        "Both running"
    ]
    assert titles(client.get(url, {"participant": cast.hospital_a.slug, "state": "completed"})) == [
        "A completed"
    ]
    none = client.get(url, {"participant": cast.hospital_b.slug, "state": "completed"})
    assert titles(none) == []
    assert "No job matches these filters." in none.content.decode()


def test_the_choices_are_only_what_the_user_may_see(cast, jobs, elsewhere):
    MembershipFactory(user=cast.auditor, consortium=elsewhere.consortium, role="auditor")
    response = cast.client_for("auditor").get(list_url(cast.consortium))
    assert options(response, "participant") == ["", cast.hospital_a.slug, cast.hospital_b.slug]
    assert options(response, "state") == ["", *JobState.values]
    assert "Elsewhere job" not in titles(response)


def test_an_institution_of_another_consortium_is_refused_in_words(cast, jobs, elsewhere):
    response = cast.client_for("admin").get(
        list_url(cast.consortium), {"participant": elsewhere.slug}
    )
    assert response.status_code == 200
    html = response.content.decode()
    assert f"No institution “{elsewhere.slug}” took part in a job you can see" in html
    assert 'id="filter-errors" role="alert"' in html
    # The filter it could not use is not applied: every job of this consortium, none of the other.
    assert sorted(titles(response)) == ["A completed", "A draft", "B running", "Both running"]


def test_an_unknown_state_is_said_in_words_not_a_500(cast, jobs):
    response = cast.client_for("admin").get(
        list_url(cast.consortium), {"state": "exploded", "participant": cast.hospital_a.slug}
    )
    assert response.status_code == 200
    assert "“exploded” is not a job state: the list shows every state." in (
        response.content.decode()
    )
    # The participant filter, which is valid, still applies.
    assert sorted(titles(response)) == ["A completed", "Both running"]


def test_the_pager_keeps_the_filters(cast, monkeypatch):
    monkeypatch.setattr("training.web.views.jobs.JOBS_PER_PAGE", 2)
    for n in range(3):
        plant_job(cast.consortium, title=f"A run {n}", institutions=[cast.hospital_a])
    plant_job(cast.consortium, title="B run", institutions=[cast.hospital_b])
    plant_job(cast.consortium, title="A done", institutions=[cast.hospital_a], state="completed")
    client = cast.client_for("researcher")
    url = list_url(cast.consortium)
    first = client.get(url, {"participant": cast.hospital_a.slug, "state": "running"})
    assert "3 jobs match, page 1 of 2" in first.content.decode()
    next_link = re.search(r'<a href="(\?[^"]+)">Next</a>', first.content.decode()).group(1)
    next_link = next_link.replace("&amp;", "&")
    assert f"participant={cast.hospital_a.slug}" in next_link and "state=running" in next_link
    second = client.get(url + next_link)
    assert "page 2 of 2" in second.content.decode()
    seen = titles(first) + titles(second)
    assert sorted(seen) == ["A run 0", "A run 1", "A run 2"]


@pytest.mark.parametrize(
    ("who", "expected"), [("anonymous", 302), ("outsider", 404), ("other_member", 200)]
)
def test_a_filtered_list_is_still_the_consortiums_page(cast, jobs, who, expected):
    response = cast.client_for(who).get(
        list_url(cast.consortium), {"participant": cast.hospital_a.slug}
    )
    assert response.status_code == expected


def test_the_list_offers_two_boxes_to_compare_with_labels(cast, jobs):
    html = cast.client_for("researcher").get(list_url(cast.consortium)).content.decode()
    compare = reverse("training:job-compare", args=[cast.consortium.slug])
    assert f'action="{compare}"' in html
    for job in jobs.values():
        assert f'name="jobs" value="{job.pk}" id="compare-{job.pk}"' in html
        assert f'<label for="compare-{job.pk}" class="visually-hidden">' in html
