"""Two jobs side by side (issue 14): ``consortia/<slug>/jobs/compare/?a=<id>&b=<id>``.

The page shows each job's spec essentials, state, final metric, validation metric per round
(one chart, and the same values in a table) and ε spent per institution against its cap, all
read through :func:`training.rounds.live.job_live_state` (the job page's own series). Both jobs
must be ones the user may see: anything else is the same 404 as a missing job. Numbers that are
missing, the same twice or not numbers get the picker back with a sentence saying why.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from consortium.core import palette
from consortium.governance.services.institutions import consortium_create, institution_create
from tests.support.agreements import agreement_in_force
from tests.support.factories import MembershipFactory, UserFactory
from tests.support.planted_jobs import plant_job
from training.models import JobState
from training.rounds.live import job_live_state

BASE_DIR = Path(settings.BASE_DIR)


def compare_url(consortium) -> str:
    return reverse("training:job-compare", args=[consortium.slug])


def text_of(response) -> str:
    html = re.sub(r"<script.*?</script>", " ", response.content.decode(), flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def chart_of(response) -> dict:
    found = re.search(
        r'<script id="compare-chart" type="application/json">(.*?)</script>',
        response.content.decode(),
        re.S,
    )
    return json.loads(found.group(1))


@pytest.fixture
def pair(cast):
    """Job A (both hospitals, completed, three rounds) and job B (hospital A, running, two
    rounds, a noisier pipeline and another model), under the agreement in force."""
    version = agreement_in_force(cast)
    first = plant_job(
        cast.consortium,
        title="Baseline MLP",
        institutions=[cast.hospital_a, cast.hospital_b],
        state=JobState.COMPLETED,
        version=version,
        metrics=[0.61, 0.74, 0.81],
        rounds=3,
    )
    second = plant_job(
        cast.consortium,
        title="Linear, more noise",
        institutions=[cast.hospital_a],
        version=version,
        metrics=[0.55, 0.66],
        rounds=6,
        noise_multiplier=8.0,
        model={"name": "logistic_regression", "params": {}},
    )
    return first, second


@pytest.fixture
def elsewhere_job(db):
    """A job of another consortium, which the cast's people are not members of."""
    admin = UserFactory(username="elsewhere_admin")
    consortium = consortium_create(acting_user=admin, name="Elsewhere")
    hospital = institution_create(acting_user=admin, consortium=consortium, name="Hospital Z")
    return plant_job(consortium, title="Elsewhere job", institutions=[hospital], metrics=[0.5])


def test_two_jobs_side_by_side(cast, pair):
    first, second = pair
    response = cast.client_for("researcher").get(
        compare_url(cast.consortium), {"a": first.pk, "b": second.pk}
    )
    assert response.status_code == 200
    text = text_of(response)
    assert f"Job #{first.pk} and job #{second.pk} side by side" in text
    assert "Baseline MLP" in text and "Linear, more noise" in text
    # Spec essentials of each: model, data set, rounds, participants, privacy pipeline.
    assert "mlp —" in text and "logistic_regression" in text
    assert "3 of 3 closed" in text and "2 of 6 closed" in text
    assert "Hospital A, Hospital B" in text
    assert "noise multiplier 5" in text.lower() and "noise multiplier 8" in text.lower()
    # The state and the final metric (a running job's is "so far").
    assert "Completed" in text and "Running" in text
    assert "0.8100 accuracy after round 3" in text
    assert "0.6600 accuracy after round 2 (so far: the job is running)" in text


def test_the_chart_is_the_job_pages_series_for_both_jobs(cast, pair):
    first, second = pair
    response = cast.client_for("auditor").get(
        compare_url(cast.consortium), {"a": first.pk, "b": second.pk}
    )
    chart = chart_of(response)
    assert chart["metric"] == "accuracy" and chart["unit_range"] is True
    for trace, job in zip(chart["traces"], pair, strict=True):
        series = job_live_state(job)["series"]
        assert trace["rounds"] == series["rounds"]
        assert trace["values"] == series["validation"]
        assert trace["name"].startswith(f"#{job.pk} ") or f"#{job.pk} " in trace["name"]
    assert [t["name"].split(":")[0] for t in chart["traces"]] == ["A", "B"]
    # Colours from the one palette, never hard-coded in the page's script.
    assert [t["colour"] for t in chart["traces"]] == list(palette.SERIES[:2])
    assert (chart["axis"], chart["grid"]) == (palette.AXIS, palette.GRID)
    script = (BASE_DIR / "static" / "js" / "job_compare.js").read_text()
    assert not re.search(r"#[0-9a-fA-F]{6}", script)
    # Plotly is served from our own static files, never a CDN.
    html = response.content.decode()
    assert '<script src="/static/vendor/plotly.min.js" defer>' in html
    # Every script and stylesheet the page loads is one of ours (a CSRF token may well
    # contain the letters "cdn", so look at the addresses, not the whole page).
    loaded = re.findall(r'<(?:script|link)\b[^>]*?\b(?:src|href)="([^"]*)"', html)
    assert loaded and all(
        address.startswith("/") and not address.startswith("//") for address in loaded
    )
    # The same values in a table, round by round ("—" where one job has no such round).
    table = html.split('<table id="compare-rounds">', 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr><td>(\d+)</td><td>([^<]+)</td><td>([^<]+)</td></tr>", table)
    assert rows == [
        ("1", "0.6100", "0.5500"),
        ("2", "0.7400", "0.6600"),
        ("3", "0.8100", "—"),
    ]


def test_epsilon_per_institution_against_its_cap(cast, pair):
    first, second = pair
    response = cast.client_for("approver").get(
        compare_url(cast.consortium), {"a": first.pk, "b": second.pk}
    )
    html = response.content.decode()
    for letter, job in (("a", first), ("b", second)):
        table = html.split(f'<table id="privacy-{letter}"', 1)[1].split("</table>", 1)[0]
        rows = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td><td>([^<]+)</td><td>8</td>", table)
        expected = [
            (p["institution"], f"{p['job']:.2f}", f"{p['spent']:.2f}")
            for p in job_live_state(job)["series"]["privacy"]
        ]
        assert rows == expected
    # Hospital A spent in both jobs: its total is the same on both sides, and more than either.
    total_a = re.findall(r"<td>Hospital A</td><td>([\d.]+)</td><td>([\d.]+)</td>", html)
    assert total_a[0][1] == total_a[1][1]
    assert float(total_a[0][1]) > max(float(total_a[0][0]), float(total_a[1][0]))


def test_a_job_with_no_measured_round_draws_no_chart(cast, pair):
    draft = plant_job(cast.consortium, title="Just a draft", state=JobState.DRAFT)
    response = cast.client_for("researcher").get(
        compare_url(cast.consortium), {"a": draft.pk, "b": pair[0].pk}
    )
    assert response.status_code == 200
    text = text_of(response)
    assert "not measured yet" in text and "No participant yet (a draft)." in text
    [trace] = chart_of(response)["traces"]
    assert trace["name"].split(":")[0] == "B"
    # Job B keeps its colour (the palette's second) when job A has nothing to draw.
    assert trace["colour"] == palette.SERIES[1]
    other = plant_job(cast.consortium, title="Another draft", state=JobState.DRAFT)
    response = cast.client_for("researcher").get(
        compare_url(cast.consortium), {"a": draft.pk, "b": other.pk}
    )
    assert "Neither job has a measured round yet" in text_of(response)
    assert "plotly" not in response.content.decode()


def test_ticked_boxes_from_the_list_open_the_comparison(cast, pair):
    first, second = pair
    client = cast.client_for("researcher")
    # The list shows the newest first; the older job is A all the same.
    response = client.get(compare_url(cast.consortium) + f"?jobs={second.pk}&jobs={first.pk}")
    assert response.status_code == 302
    assert response["Location"] == compare_url(cast.consortium) + f"?a={first.pk}&b={second.pk}"
    page = client.get(response["Location"])
    assert page.status_code == 200 and "Baseline MLP" in text_of(page)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("jobs={a}", "Tick two jobs to compare: 1 job was ticked."),
        ("jobs={a}&jobs={b}&jobs={a}", "Tick two jobs to compare: 3 jobs were ticked."),
        # The picker sent without a second job (``b`` there, empty): a mistake to point out.
        ("a={a}&b=", "Choose a second job to compare with job #{a}."),
        ("b={b}", "Choose a second job to compare with job #{b}."),
        ("a={a}&b={a}", "Choose two different jobs: job #{a} was chosen twice."),
        ("a=seven&b={b}", "First job: “seven” is not a job number."),
        ("a={a}&b=-3", "Second job: job numbers start at 1."),
        ("a=&b=", "Choose the two jobs to compare."),
    ],
)
def test_bad_input_gets_the_picker_back_with_why(cast, pair, query, message):
    first, second = pair
    ids = {"a": first.pk, "b": second.pk}
    response = cast.client_for("researcher").get(
        compare_url(cast.consortium) + "?" + query.format(**ids)
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert 'id="compare-errors" role="alert"' in html
    assert message.format(**ids) in text_of(response)
    assert 'id="compare-picker"' in html and "compare-sides" not in html


def test_the_picker_offers_only_the_jobs_the_user_may_see(cast, pair, elsewhere_job):
    MembershipFactory(user=cast.auditor, consortium=elsewhere_job.consortium, role="auditor")
    response = cast.client_for("auditor").get(compare_url(cast.consortium))
    assert response.status_code == 200
    html = response.content.decode()
    select = re.search(r'<select name="a"[^>]*>(.*?)</select>', html, re.S).group(1)
    offered = re.findall(r'<option value="(\d+)"', select)
    assert sorted(offered) == sorted(str(j.pk) for j in pair)
    assert "compare-errors" not in html


def test_the_first_job_alone_shows_it_and_asks_for_the_second(cast, pair, elsewhere_job):
    """``?a=<id>`` alone (the job page's "Compare with another job" link) is a normal page:
    job A's column, and the picker offering the second job among the jobs the user may see
    (not A itself, not another consortium's job even to a member of both)."""
    first, second = pair
    MembershipFactory(user=cast.researcher, consortium=elsewhere_job.consortium, role="auditor")
    response = cast.client_for("researcher").get(compare_url(cast.consortium), {"a": first.pk})
    assert response.status_code == 200
    html = response.content.decode()
    text = text_of(response)
    assert "compare-errors" not in html
    assert f"Compare job #{first.pk} with another job" in text
    assert f"Choose the second job to compare job #{first.pk} with" in text
    # Job A's side, as it will read beside the second job.
    sides = html.split('<table id="compare-sides">', 1)[1].split("</table>", 1)[0]
    assert "Baseline MLP" in sides and "Linear, more noise" not in sides
    assert "0.8100 accuracy after round 3" in text
    assert [t["name"].split(":")[0] for t in chart_of(response)["traces"]] == ["A"]
    assert 'id="privacy-a"' in html and 'id="privacy-b"' not in html
    # The picker: A stays chosen; B offers the other jobs the user may see, and only those.
    picker = html.split('id="compare-picker"', 1)[1].split("</form>", 1)[0]
    assert 'method="get"' in html.split('id="compare-picker"', 1)[0].rsplit("<form", 1)[1]
    select_a = re.search(r'<select name="a"[^>]*>(.*?)</select>', picker, re.S).group(1)
    select_b = re.search(r'<select name="b"[^>]*>(.*?)</select>', picker, re.S).group(1)
    assert f'<option value="{first.pk}" selected>' in select_a
    assert re.findall(r'<option value="(\d+)"', select_b) == [str(second.pk)]
    assert str(elsewhere_job.pk) not in re.findall(r'<option value="(\d+)"', picker)
    # Choosing the second job in that picker is the full comparison.
    both = cast.client_for("researcher").get(
        compare_url(cast.consortium), {"a": first.pk, "b": second.pk}
    )
    assert both.status_code == 200
    assert f"Job #{first.pk} and job #{second.pk} side by side" in text_of(both)


def test_the_first_job_alone_with_no_measured_round(cast):
    draft = plant_job(cast.consortium, title="Just a draft", state=JobState.DRAFT)
    response = cast.client_for("researcher").get(compare_url(cast.consortium), {"a": draft.pk})
    assert response.status_code == 200
    assert "The job has no measured round yet" in text_of(response)
    assert "plotly" not in response.content.decode()


def test_the_first_job_alone_keeps_the_400_and_404(cast, pair, elsewhere_job):
    """Alone or not, a malformed number is bad input and a job the user may not see (or one
    that does not exist) is the 404 a missing job gets."""
    client = cast.client_for("researcher")
    url = compare_url(cast.consortium)
    malformed = client.get(url, {"a": "seven"})
    assert malformed.status_code == 400
    assert "First job: “seven” is not a job number." in text_of(malformed)
    assert "compare-sides" not in malformed.content.decode()
    missing = client.get(url, {"a": 999_999})
    hidden = client.get(url, {"a": elsewhere_job.pk})
    assert missing.status_code == hidden.status_code == 404
    assert text_of(missing) == text_of(hidden)


def test_the_job_page_links_to_comparing_it(cast, pair):
    first, _second = pair
    client = cast.client_for("other_member")
    page = client.get(reverse("training:job-detail", args=[cast.consortium.slug, first.pk]))
    assert page.status_code == 200
    link = re.search(
        r'<a [^>]*id="compare-link"[^>]*href="([^"]+)"[^>]*>([^<]+)</a>', page.content.decode()
    )
    assert link is not None and link.group(2) == "Compare with another job"
    address = link.group(1).replace("&amp;", "&")
    assert address == compare_url(cast.consortium) + f"?a={first.pk}"
    assert client.get(address).status_code == 200


@pytest.mark.parametrize("who", ["researcher", "other_member", "approver", "auditor", "admin"])
def test_every_member_may_compare(cast, pair, who):
    first, second = pair
    response = cast.client_for(who).get(
        compare_url(cast.consortium), {"a": first.pk, "b": second.pk}
    )
    assert response.status_code == 200


def test_anonymous_is_sent_to_sign_in_and_an_outsider_gets_404(cast, pair):
    first, second = pair
    query = {"a": first.pk, "b": second.pk}
    anonymous = cast.client_for("anonymous").get(compare_url(cast.consortium), query)
    assert anonymous.status_code == 302 and "login" in anonymous["Location"]
    assert cast.client_for("outsider").get(compare_url(cast.consortium), query).status_code == 404


def test_a_job_the_member_cannot_see_is_the_same_404_as_a_missing_one(cast, pair, elsewhere_job):
    first, _second = pair
    client = cast.client_for("researcher")
    url = compare_url(cast.consortium)
    missing = client.get(url, {"a": first.pk, "b": 999_999})
    hidden = client.get(url, {"a": first.pk, "b": elsewhere_job.pk})
    assert missing.status_code == hidden.status_code == 404
    assert text_of(missing) == text_of(hidden)
    # Under the other consortium's address, the researcher is not a member: 404 as well.
    other = compare_url(elsewhere_job.consortium)
    assert client.get(other, {"a": elsewhere_job.pk, "b": first.pk}).status_code == 404


def test_a_job_of_another_consortium_is_404_even_for_a_member_of_both(cast, pair, elsewhere_job):
    """Each consortium's page compares its own jobs: a member of both who puts the other
    consortium's job in the address gets the 404 a missing job gets."""
    MembershipFactory(user=cast.researcher, consortium=elsewhere_job.consortium, role="auditor")
    client = cast.client_for("researcher")
    response = client.get(compare_url(cast.consortium), {"a": pair[0].pk, "b": elsewhere_job.pk})
    assert response.status_code == 404


def test_the_query_count_does_not_grow_with_the_rounds(cast):
    version = agreement_in_force(cast)
    sites = [cast.hospital_a, cast.hospital_b]

    def queries(rounds: int) -> int:
        jobs = [
            plant_job(
                cast.consortium,
                title=f"{rounds} rounds {n}",
                institutions=sites,
                version=version,
                metrics=[0.5] * rounds,
            )
            for n in range(2)
        ]
        client = cast.client_for("researcher")
        url = compare_url(cast.consortium)
        client.get(url, {"a": jobs[0].pk, "b": jobs[1].pk})  # warm the session
        with CaptureQueriesContext(connection) as captured:
            assert client.get(url, {"a": jobs[0].pk, "b": jobs[1].pk}).status_code == 200
        return len(captured)

    assert queries(2) == queries(6)


def test_a_number_too_big_for_any_job_is_bad_input_not_a_500(cast, pair):
    response = cast.client_for("researcher").get(
        compare_url(cast.consortium), {"a": pair[0].pk, "b": "9" * 30}
    )
    assert response.status_code == 400
    assert "Second job: no job has a number that large." in text_of(response)


def test_the_pickers_fields_have_labels(cast, pair):
    first, second = pair
    html = (
        cast.client_for("researcher")
        .get(compare_url(cast.consortium), {"a": first.pk, "b": second.pk})
        .content.decode()
    )
    for name, label in (("a", "First job"), ("b", "Second job")):
        assert re.search(rf'<select name="{name}" id="id_{name}">', html)
        assert f'<label for="id_{name}">{label}</label>' in html
    # The chosen jobs stay chosen in the picker.
    assert f'<option value="{first.pk}" selected>' in html
    assert f'<option value="{second.pk}" selected>' in html
