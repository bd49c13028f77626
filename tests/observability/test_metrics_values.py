"""What /metrics says matches the rows: rounds, jobs, updates, rejections by code, the outbox,
the central services' and the sites' heartbeats, the broker's queues. And a scrape costs the
same few queries however many jobs there are."""

from __future__ import annotations

from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from consortium.observability import metrics, queues
from consortium.observability.metrics import OperationsCollector, build_registry
from tests.observability.conftest import make_credential, make_job, make_round, plant_rejection
from tests.observability.scraping import broker_answering, parse, series, value
from tests.support.factories import UserFactory
from training.models import JobState, Round, SiteUpdate


def scrape(monkeypatch, depths=None) -> dict:
    """Scrape /metrics as staff through the URL, with the broker answering ``depths``."""
    monkeypatch.setattr(
        metrics,
        "REGISTRY",
        build_registry(collector=OperationsCollector(queue_depths=broker_answering(depths))),
    )
    client = Client()
    client.force_login(UserFactory(username="ops", is_staff=True))
    response = client.get("/metrics")
    assert response.status_code == 200, response.content
    return parse(response.content.decode())


def test_rounds_and_jobs_by_state(ops_scene, monkeypatch):
    samples = scrape(monkeypatch)
    assert series(samples, "fl_rounds") == {
        (("job_state", "running"), ("state", "closed")): 1,
        (("job_state", "running"), ("state", "open")): 1,
        (("job_state", "running"), ("state", "aggregating")): 1,
        (("job_state", "failed"), ("state", "failed")): 1,
    }
    assert value(samples, "fl_jobs", state="running") == 2
    assert value(samples, "fl_jobs", state="failed") == 1
    assert value(samples, "fl_jobs", state="completed") == 0  # every state, zeros included
    assert len(series(samples, "fl_jobs")) == len(JobState.values)
    # Round 2 of the running job is open past its deadline; the stuck one's lease ran out.
    assert value(samples, "fl_rounds_past_deadline", state="open") == 1
    assert value(samples, "fl_rounds_past_deadline", state="aggregating") == 0
    assert value(samples, "fl_round_leases_expired") == 1


def test_updates_by_status_and_rejections_by_code(ops_scene, monkeypatch):
    samples = scrape(monkeypatch)
    assert series(samples, "fl_site_updates") == {
        (("status", "accepted"),): 2,
        (("status", "rejected"),): 1,
        (("status", "dispatched"),): 1,
        (("status", "straggler"),): 1,
    }
    # The ledger's codes, never the reason's text; a code that is not a code word is "other".
    assert series(samples, "fl_site_updates_rejected_total") == {
        (("reason", "bad_signature"),): 2,
        (("reason", "digest_mismatch"),): 1,
        (("reason", "other"),): 1,
    }


def test_outbox_backlog(ops_scene, monkeypatch):
    samples = scrape(monkeypatch)
    assert value(samples, "fl_outbox_pending") == 2
    assert value(samples, "fl_outbox_failing") == 1
    assert 120 <= value(samples, "fl_outbox_oldest_pending_age_seconds") < 180


def test_outbox_empty_reads_zero(cast, monkeypatch):
    samples = scrape(monkeypatch)
    assert value(samples, "fl_outbox_pending") == 0
    assert value(samples, "fl_outbox_oldest_pending_age_seconds") == 0


def test_central_services(ops_scene, monkeypatch, settings):
    settings.FL_OUTBOX_STALE_SECONDS = 60
    samples = scrape(monkeypatch)
    assert value(samples, "fl_service_up", service="coordinator") == 1
    assert value(samples, "fl_service_up", service="tick") == 0  # 300 s > 3 x 10 s
    assert value(samples, "fl_service_up", service="relay") == 0  # a message waits 120 s > 60 s
    assert 2 <= value(samples, "fl_service_heartbeat_age_seconds", service="coordinator") < 60
    assert 300 <= value(samples, "fl_service_heartbeat_age_seconds", service="tick") < 360
    assert value(samples, "fl_service_instances", service="coordinator") == 1


def test_no_coordinator_ever_is_down_with_no_age(cast, monkeypatch):
    samples = scrape(monkeypatch)
    assert value(samples, "fl_service_up", service="coordinator") == 0
    assert value(samples, "fl_service_heartbeat_age_seconds", service="coordinator") is None


def test_site_workers(ops_scene, monkeypatch, cast):
    samples = scrape(monkeypatch)
    a, b = cast.hospital_a.slug, cast.hospital_b.slug
    assert value(samples, "fl_site_worker_up", site=a) == 1
    assert value(samples, "fl_site_worker_up", site=b) == 0  # credentials, never heard from
    assert 10 <= value(samples, "fl_site_worker_heartbeat_age_seconds", site=a) < 60
    assert value(samples, "fl_site_worker_heartbeat_age_seconds", site=b) is None


def test_revoked_credentials_are_not_listed(ops_scene, monkeypatch, cast):
    from django.utils import timezone

    ops_scene.credential_b.revoked_at = timezone.now()
    ops_scene.credential_b.save()
    samples = scrape(monkeypatch)
    assert set(series(samples, "fl_site_worker_up")) == {(("site", cast.hospital_a.slug),)}


def test_queue_depths_of_central_scoring_and_the_sites(ops_scene, monkeypatch, cast):
    a, b = cast.hospital_a.slug, cast.hospital_b.slug
    samples = scrape(monkeypatch, depths={"central": 4, "scoring": 3, f"site.{a}": 2})
    assert value(samples, "fl_broker_up") == 1
    assert series(samples, "fl_broker_queue_messages") == {
        (("queue", "central"),): 4,
        (("queue", "scoring"),): 3,
        (("queue", f"site.{a}"),): 2,
        (("queue", f"site.{b}"),): 0,
    }


def test_build_info(cast, monkeypatch):
    samples = scrape(monkeypatch)
    ((labels, one),) = series(samples, "fl_build_info").items()
    assert one == 1
    assert dict(labels)["database"] == connection.vendor
    assert dict(labels)["site_protocol"] == "1"


def test_a_broker_that_is_down_says_so_and_the_scrape_answers(ops_scene, monkeypatch):
    # Nothing listens on port 1: the connection is refused at once.
    monkeypatch.setattr(queues, "broker_config", lambda: ("redis://127.0.0.1:1/0", {}))
    monkeypatch.setattr(metrics, "REGISTRY", build_registry())
    client = Client()
    client.force_login(UserFactory(username="ops", is_staff=True))
    response = client.get("/metrics")
    assert response.status_code == 200
    samples = parse(response.content.decode())
    assert value(samples, "fl_broker_up") == 0
    assert series(samples, "fl_broker_queue_messages") == {}
    assert value(samples, "fl_rounds_past_deadline", state="open") == 1  # the rest is there


def _add_jobs(consortium, institutions, count):
    for _ in range(count):
        job = make_job(consortium)
        for index, state in enumerate((Round.State.CLOSED, Round.State.OPEN), start=1):
            rnd = make_round(job, index, state=state)
            for institution in institutions:
                SiteUpdate.objects.create(
                    round=rnd, institution=institution, status=SiteUpdate.Status.ACCEPTED
                )
    for institution in institutions:
        make_credential(institution, label=f"extra-{count}")
    for code in ("bad_samples", "too_large"):
        plant_rejection(code)


def _queries_of_one_scrape() -> int:
    collector = OperationsCollector(queue_depths=broker_answering())
    with CaptureQueriesContext(connection) as captured:
        families = list(collector.collect())
    assert families
    return len(captured.captured_queries)


def test_the_scrape_costs_a_fixed_number_of_queries(ops_scene, cast, django_assert_max_num_queries):
    few = _queries_of_one_scrape()
    _add_jobs(cast.consortium, [cast.hospital_a, cast.hospital_b], 12)
    many = _queries_of_one_scrape()
    assert few == many
    # Through the view, with the session and the user's look-ups.
    client = Client()
    client.force_login(UserFactory(username="ops", is_staff=True))
    with django_assert_max_num_queries(14):
        assert client.get("/metrics").status_code == 200
