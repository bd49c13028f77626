"""The job page's summary, its success box, its model block and download, and its rounds
site by site (issue 14: "pages a hospital would be proud of").

The download's rule is ``training.download_model``: the consortium's admins and the members of
the institutions taking part; any other member of the consortium, and an outsider, get the same
404 as for a model that does not exist.
"""

from __future__ import annotations

import html
import json
import re

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from audit.models import LedgerEntry
from tests.support.fl_harness import use_artifact_folder
from tests.support.job_page_fixtures import ACCURACY, REJECT_REASON, job_with_rounds, model_bytes
from tests.support.planted_jobs import plant_job
from tests.support.training_fixtures import make_scene
from training.models import GlobalModel
from training.rounds.artifacts import sha256_hex

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _artifacts(settings, tmp_path):
    return use_artifact_folder(settings, tmp_path / "artifacts")


@pytest.fixture
def scene(cast):
    return make_scene(cast)


def job_url(job) -> str:
    return reverse("training:job-detail", args=[job.consortium.slug, job.pk])


def download_url(job, round_index: int) -> str:
    return reverse("training:job-model-download", args=[job.consortium.slug, job.pk, round_index])


def shown(response) -> str:
    assert response.status_code == 200
    return re.sub(r"\s+", " ", html.unescape(response.content.decode()))


def words(fragment: str) -> str:
    """A fragment's text, tags dropped."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", fragment))


def block(page: str, element_id: str) -> str:
    """The text from ``id="element_id"`` to the end of its section."""
    start = page.index(f'id="{element_id}"')
    return page[start : page.index("</section>", start)]


def test_the_summary_comes_first_and_says_state_rounds_metric_privacy_and_whom_it_waits_on(
    cast, scene
):
    job = job_with_rounds(scene, rounds=3, complete=False)
    page = shown(cast.client_for("approver").get(job_url(job)))
    summary = block(page, "job-summary")
    # First of the page's sections, before the progress panel and the rest.
    assert page.index('id="job-summary"') < page.index('id="live"') < page.index('id="rounds"')
    assert "Running" in summary
    assert "3 of 10 rounds closed" in summary
    assert f"accuracy {ACCURACY[3]:.3f} after round 3" in words(summary)
    assert f"initial model {ACCURACY[0]:.3f}" in words(summary)
    for name in ("Hospital A", "Hospital B"):
        assert re.search(rf"{name}</th>.*?ε [\d.]+ of [\d.]+", summary), name
    # Round 3 closed and no coordinator runs: nothing moves until one does.
    assert "No coordinator has been heard from yet" in summary
    # The contents list reaches every section.
    for anchor in ("live", "model", "rounds", "participants", "contributions", "spec", "history"):
        assert f'href="#{anchor}"' in summary
        assert f'id="{anchor}"' in page


def test_an_awaiting_job_says_whose_decision_it_waits_on(cast, scene):
    job = scene.propose()
    scene.decide(job, cast.hospital_a)
    page = shown(cast.client_for("researcher").get(job_url(job)))
    waiting = block(page, "job-summary")
    assert "The decision of Hospital B" in waiting
    assert "The decision of Hospital A" not in waiting and "Hospital A," not in waiting


def test_a_completed_job_is_announced_as_a_success(cast, scene):
    job = job_with_rounds(scene, rounds=3)
    page = shown(cast.client_for("researcher").get(job_url(job)))
    end = page[page.index('id="job-end"') : page.index('id="job-actions"')]
    assert 'class="notice success"' in end
    assert "Completed." in end and "All 3 rounds closed" in end
    assert 'class="notice"' not in end and "notice bad" not in end and "notice warn" not in end


def test_charts_wait_for_the_first_round(cast, scene):
    job = scene.propose()
    page = shown(cast.client_for("researcher").get(job_url(job)))
    assert re.search(r'<div class="charts" id="charts" hidden>', page)
    assert 'id="charts-empty">' in page and "once the first round has closed" in page
    palette = page[page.index('id="chart-palette"') :]
    assert '"Hospital A": "#' in palette[:2000]


def test_the_final_model_block_gives_where_digest_and_lineage(cast, scene):
    job = job_with_rounds(scene, rounds=3)
    final = GlobalModel.objects.get(job=job, round_index=3)
    page = shown(cast.client_for("other_member").get(job_url(job)))
    model = block(page, "model")
    assert "Final model" in model
    assert final.digest in model and final.lineage_hash in model
    assert f"{final.digest[:2]}/{final.digest[2:4]}/{final.digest}" in model
    assert "4 versions" in model  # rounds 3, 2, 1 and the initial model
    for m in GlobalModel.objects.filter(job=job):
        assert m.digest[:16] in model
    # other_member is at hospital B, a participant: offered the download.
    assert download_url(job, 3) in model


@pytest.mark.parametrize("who", ["admin", "researcher", "approver", "other_member", "steward"])
def test_the_allowed_get_the_models_bytes_and_digest(cast, scene, who):
    job = job_with_rounds(scene, rounds=3)
    response = cast.client_for(who).get(download_url(job, 3))
    assert response.status_code == 200
    body = b"".join(response.streaming_content) if response.streaming else response.content
    assert body == model_bytes(3)
    assert response["X-Content-SHA256"] == sha256_hex(model_bytes(3))
    assert "attachment" in response["Content-Disposition"]
    # Who took which model away is on the record.
    (entry,) = LedgerEntry.objects.filter(event="model.downloaded")
    payload = json.loads(entry.payload_text)
    assert payload == {
        "job_id": job.pk,
        "round": 3,
        "digest": sha256_hex(model_bytes(3)),
        "size_bytes": len(model_bytes(3)),
    }
    assert entry.actor_id_at_write == getattr(cast, who).pk


def test_the_auditor_sees_the_model_but_may_not_download_it(cast, scene):
    """A consortium member outside the participating institutions: the rule refuses it."""
    job = job_with_rounds(scene, rounds=1)
    client = cast.client_for("auditor")
    model = block(shown(client.get(job_url(job))), "model")
    assert GlobalModel.objects.get(job=job, round_index=1).digest in model
    assert download_url(job, 1) not in model
    assert client.get(download_url(job, 1)).status_code == 404


def test_an_anonymous_visitor_is_sent_to_sign_in(cast, scene):
    job = job_with_rounds(scene, rounds=1)
    response = cast.client_for("anonymous").get(download_url(job, 1))
    assert response.status_code == 302 and "login" in response["Location"]


def test_an_outsider_gets_404_for_the_page_and_the_model(cast, scene):
    job = job_with_rounds(scene, rounds=1)
    client = cast.client_for("outsider")
    assert client.get(job_url(job)).status_code == 404
    assert client.get(download_url(job, 1)).status_code == 404


def test_a_member_the_rule_refuses_gets_404_and_no_download_button(cast, scene):
    """Hospital B withdrawn from the job: its members still see the job (they are members of
    the consortium) but may no longer take its model away."""
    job = job_with_rounds(scene, rounds=2)
    job.participants.filter(institution=cast.hospital_b).update(status="removed")
    client = cast.client_for("other_member")
    page = shown(client.get(job_url(job)))
    model = block(page, "model")
    assert download_url(job, 2) not in model
    assert "Only the consortium's administrators and the members" in model
    assert client.get(download_url(job, 2)).status_code == 404
    # ... the same 404 as a model that does not exist, for someone allowed.
    assert cast.client_for("admin").get(download_url(job, 9)).status_code == 404
    assert not LedgerEntry.objects.filter(event="model.downloaded").exists()


def test_each_round_lists_each_sites_duration_status_and_reason(cast, scene):
    job = job_with_rounds(scene, rounds=3)
    page = shown(cast.client_for("researcher").get(job_url(job)))
    rounds = block(page, "rounds")
    # Newest first, the newest open and the past folded.
    assert re.search(r'<details class="round" id="round-3" data-round="3" open>', rounds)
    assert re.search(r'<details class="round" id="round-1" data-round="1">', rounds)
    where = [rounds.index(f'id="round-{index}"') for index in (3, 2, 1)]
    assert where == sorted(where)
    first = rounds[rounds.index('id="round-1"') :]
    assert "1 of 2 updates accepted" in first
    row_b = re.search(r'<tr data-status="rejected">(.*?)</tr>', first).group(1)
    assert "Hospital B" in row_b and "Rejected" in row_b and REJECT_REASON in row_b
    assert "2 min" in row_b  # sent and received 120 s apart
    row_a = re.search(r'<tr data-status="accepted">(.*?)</tr>', first).group(1)
    assert "Hospital A" in row_a and "300" in row_a and " UTC" in row_a


def test_the_pages_queries_do_not_grow_with_the_rounds(cast, scene):
    def queries(job) -> int:
        client = cast.client_for("researcher")
        client.get(job_url(job))  # warm the session and caches
        with CaptureQueriesContext(connection) as captured:
            assert client.get(job_url(job)).status_code == 200
        return len(captured)

    short = queries(job_with_rounds(scene, rounds=1))
    assert queries(job_with_rounds(scene, rounds=4)) == short


def test_the_page_reads_its_job_and_participants_once(cast, scene):
    """The live state and the waiting words are given the job the page has just read, with
    its participants: they read it again only for the websocket, which holds its job for the
    socket's lifetime (three queries fewer; the page was at 32 on PostgreSQL)."""
    job = job_with_rounds(scene, rounds=2)
    client = cast.client_for("researcher")
    client.get(job_url(job))
    with CaptureQueriesContext(connection) as captured:
        page = shown(client.get(job_url(job)))
    reads = [q["sql"] for q in captured if q["sql"].lstrip().upper().startswith("SELECT")]
    assert sum(' FROM "training_trainingjob"' in sql for sql in reads) == 1
    assert sum(' FROM "training_jobparticipant"' in sql for sql in reads) == 1
    assert "1 of 2 updates accepted" in page  # the live state still drew the rounds


def test_the_title_and_crumbs_carry_no_stray_closing_tag(cast):
    """The job page's title block once ended in a stray ``</div>``: the browser tab read
    "Job #1 …</div>", and the crumbs' one closed ``<main>``'s content early."""
    job = plant_job(cast.consortium, title="Tidy title", institutions=[cast.hospital_a])
    page = cast.client_for("researcher").get(job_url(job)).content.decode()
    title = re.search(r"<title>(.*?)</title>", page, re.S).group(1)
    assert re.sub(r"\s+", " ", title) == f"Job #{job.pk} Tidy title · FL Consortium"
    main = page.split("<main", 1)[1].split("</main>", 1)[0]
    assert main.count("<div") == main.count("</div>")
