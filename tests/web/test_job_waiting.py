"""The job page says what a running job waits on, in words (``training.rounds.waiting``): each
site still expected with its worker's state, the stage the round is at, a coordinator that is
not heard from, and the sites that missed the last N rounds. The page's first render and its
websocket say the same; no hostname is ever shown on it."""

from __future__ import annotations

import asyncio
import datetime as dt
import html
import re

import pytest
from asgiref.sync import sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from consortium.routing import websocket_urlpatterns
from tests.support.liveness_fixtures import add_round, running_job, worker_heard
from tests.support.training_fixtures import make_scene
from training.models import Round, ServiceHeartbeat, SiteUpdate, SiteWorkerStatus
from training.rounds.waiting import job_page_state, job_waiting

pytestmark = pytest.mark.django_db

S = SiteUpdate.Status


@pytest.fixture
def scene(cast):
    return make_scene(cast)


def page(cast, job, who="approver") -> str:
    response = cast.client_for(who).get(f"/consortia/{cast.consortium.slug}/jobs/{job.pk}/")
    assert response.status_code == 200
    return re.sub(r"\s+", " ", html.unescape(response.content.decode()))


def waiting_part(shown: str) -> str:
    """The page's ``#waiting`` block (server-rendered)."""
    start = shown.index('id="waiting"')
    return shown[start : shown.index('id="round-sites"', start)]


def hhmm(moment) -> str:
    return f"{moment.astimezone(dt.UTC):%H:%M} UTC"


def coordinator_heard(*, ago: dt.timedelta, hostname="central-1"):
    now = timezone.now()
    return ServiceHeartbeat.objects.create(
        component=ServiceHeartbeat.Component.COORDINATOR,
        instance=f"{hostname}:4242",
        hostname=hostname,
        pid=4242,
        started_at=now - dt.timedelta(hours=1),
        last_seen_at=now - ago,
        interval_seconds=5,
    )


def open_round(job, cast, *, sent_minutes_ago=2):
    rnd = add_round(
        job, 1, {cast.hospital_a: S.DISPATCHED, cast.hospital_b: S.DISPATCHED}, state="open"
    )
    sent = timezone.now() - dt.timedelta(minutes=sent_minutes_ago)
    rnd.updates.update(sent_at=sent)
    return rnd, sent


def test_an_open_round_names_each_site_and_its_worker(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=2))
    worker_heard(cast, cast.hospital_a, ago=dt.timedelta(minutes=4), hostname="gpu-a.internal")
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(seconds=10), hostname="gpu-b.internal")
    job = running_job(scene)
    rnd, sent = open_round(job, cast)
    a_heard = SiteWorkerStatus.objects.get(credential__institution=cast.hospital_a).last_seen_at

    shown = page(cast, job)
    part = waiting_part(shown)
    assert "Round 1 is collecting updates: 0 of 2 sites reported" in part
    assert f"Waiting on Hospital A's worker, offline for 4 min (last heard {hhmm(a_heard)})" in part
    assert f"Waiting on Hospital B's worker (online, training since {hhmm(sent)})" in part
    assert 'data-worker-state="offline"' in part and 'data-worker-state="online"' in part
    assert "coordinator" not in part  # it is alive
    # No host is named on the job page (the site workers' nor the coordinator's).
    for host in ("gpu-a.internal", "gpu-b.internal", "central-1"):
        assert host not in shown

    # A site that reported is no longer waited on.
    rnd.updates.filter(institution=cast.hospital_b).update(status=S.ACCEPTED)
    part = waiting_part(page(cast, job))
    assert "1 of 2 sites reported" in part
    assert "Hospital B's worker" not in part
    assert "Waiting on Hospital A's worker, offline for 4 min" in part


def test_a_worker_that_never_connected_and_a_site_without_credentials(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=1))
    worker_heard(cast, cast.hospital_a, ago=None)
    job = running_job(scene)
    open_round(job, cast)
    part = waiting_part(page(cast, job, "other_member"))
    assert "Waiting on Hospital A's worker, which has never connected" in part
    assert (
        "Waiting on Hospital B, which has no worker credentials: no worker can connect for it"
        in part
    )


def test_a_silent_coordinator_is_named_without_its_host(cast, scene):
    coordinator_heard(ago=dt.timedelta(minutes=5))
    job = running_job(scene)
    open_round(job, cast)
    shown = page(cast, job, "researcher")
    part = waiting_part(shown)
    assert (
        "The coordinator has not been heard from for 5 min: rounds do not move until it is back."
        in part
    )
    assert "central-1" not in shown


def test_no_coordinator_ever_heard_from_is_said_too(cast, scene):
    job = running_job(scene)
    open_round(job, cast)
    assert "No coordinator has been heard from yet" in waiting_part(page(cast, job))


def test_a_round_past_its_deadline_says_it_closes_at_the_next_pass(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=1))
    job = running_job(scene)
    rnd, _sent = open_round(job, cast)
    Round.objects.filter(pk=rnd.pk).update(deadline=timezone.now() - dt.timedelta(minutes=1))
    summary = job_waiting(job)["summary"]
    assert "has passed: it closes at the coordinator's next pass" in summary


def test_aggregation_and_a_claim_no_longer_renewed(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=1))
    job = running_job(scene)
    rnd = add_round(job, 1, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.ACCEPTED})
    claimed = timezone.now() - dt.timedelta(minutes=1)
    Round.objects.filter(pk=rnd.pk).update(state=Round.State.AGGREGATING, closed_at=claimed)
    waiting = job_waiting(job)
    assert waiting["summary"] == f"Round 1 is being aggregated (since {hhmm(claimed)})."
    assert waiting["sites"] == []
    Round.objects.filter(pk=rnd.pk).update(
        lease_expires_at=timezone.now() - dt.timedelta(seconds=40)
    )
    summary = job_waiting(job)["summary"]
    assert "stopped renewing its claim 40 s ago" in summary
    assert "the next coordinator pass takes it up again" in summary


def test_absent_sites_are_shown_on_the_page(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=1))
    job = running_job(scene)
    for index in (1, 2, 3):
        add_round(job, index, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.STRAGGLER})
    part = waiting_part(page(cast, job))
    assert "Hospital B missed the last 3 rounds (rounds 1 to 3)." in part
    assert 'data-missed="3"' in part


def test_a_job_that_does_not_run_waits_on_nothing(cast, scene):
    coordinator_heard(ago=dt.timedelta(minutes=5))
    job = scene.propose()  # awaiting approval
    assert job_waiting(job) == {"summary": "", "sites": [], "coordinator": None, "absent": []}
    part = waiting_part(page(cast, job))
    assert "Waiting on" not in part and "coordinator" not in part


def test_the_job_page_state_carries_the_same_words(cast, scene):
    coordinator_heard(ago=dt.timedelta(seconds=1))
    worker_heard(cast, cast.hospital_a, ago=dt.timedelta(minutes=4))
    job = running_job(scene)
    open_round(job, cast)
    state = job_page_state(job)
    assert state["job"]["state"] == "running"  # the live state, with the words added
    texts = [s["text"] for s in state["waiting"]["sites"]]
    assert texts[0].startswith("Waiting on Hospital A's worker, offline for 4 min")
    assert [s["label"] for s in state["waiting"]["sites"]] == ["offline", "no worker"]


@pytest.mark.django_db(transaction=True)
def test_the_websocket_sends_the_words_and_a_fresh_state_when_asked(cast, scene, settings):
    """The page asks for a fresh state every half-minute (heartbeats wake no socket): the
    consumer answers a ``refresh`` with the state, words included."""
    settings.LIVE_POLL_SECONDS = 60
    coordinator_heard(ago=dt.timedelta(seconds=1))
    worker_heard(cast, cast.hospital_a, ago=dt.timedelta(seconds=5))
    job = running_job(scene)
    open_round(job, cast)

    async def go():
        communicator = WebsocketCommunicator(
            URLRouter(websocket_urlpatterns),
            f"/ws/consortia/{cast.consortium.slug}/jobs/{job.pk}/",
        )
        communicator.scope["user"] = cast.approver
        connected, _ = await communicator.connect(timeout=20)
        assert connected
        first = await communicator.receive_json_from(timeout=20)
        assert first["state"]["waiting"]["sites"][0]["state"] == "online"
        # The worker goes quiet; no ledger entry is written, the page asks.
        await sync_to_async(
            lambda: SiteWorkerStatus.objects.update(
                last_seen_at=timezone.now() - dt.timedelta(minutes=3)
            )
        )()
        await communicator.send_json_to({"type": "refresh"})
        fresh = await communicator.receive_json_from(timeout=20)
        site = fresh["state"]["waiting"]["sites"][0]
        assert site["state"] == "offline"
        assert "offline for 3 min" in site["text"]
        await communicator.disconnect()

    asyncio.run(go())


def test_a_round_evaluated_at_the_sites_waits_on_the_sites_yet_to_report(cast, scene):
    from training.models import RoundEvaluation, SiteEvaluation

    coordinator_heard(ago=dt.timedelta(seconds=1))
    worker_heard(cast, cast.hospital_b, ago=dt.timedelta(minutes=9))
    job = running_job(scene)
    rnd = add_round(job, 1, {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.ACCEPTED})
    deadline = timezone.now() + dt.timedelta(minutes=10)
    evaluation = RoundEvaluation.objects.create(
        round=rnd, global_digest="0" * 64, asked_models=[], plan={}, deadline=deadline
    )
    SiteEvaluation.objects.create(
        evaluation=evaluation,
        institution=cast.hospital_a,
        status=SiteEvaluation.Status.REPORTED,
    )
    SiteEvaluation.objects.create(evaluation=evaluation, institution=cast.hospital_b)
    waiting = job_waiting(job)
    assert waiting["summary"] == (
        "Round 1 closed and is being evaluated at the sites: 1 of 2 reported; it is scored by "
        f"{hhmm(deadline)} at the latest."
    )
    [site] = waiting["sites"]
    assert site["text"].startswith("Waiting on Hospital B's worker, offline for 9 min")

    RoundEvaluation.objects.filter(pk=evaluation.pk).update(state=RoundEvaluation.State.CLOSED)
    waiting = job_waiting(job)
    assert waiting["sites"] == []
    assert "the next round opens at the coordinator's next pass" in waiting["summary"]
