"""What the periodic pass picks up after the coordinator fails between two commits (issue 13,
items 2 and 3): a round whose aggregation hit a database error is claimed again at the next
tick, not after the stale timeout; a round whose scoring message a dead coordinator never
published is published by the relay and scored, and the job's total written (a scoring worker
that dies: tests/rounds/test_scoring_queue.py). Jobs run through the real coordinator and
site-worker code (the in-memory broker of tests/support/coordinator_harness.py) on three
hospitals holding the bundled breast-cancer set (evaluated centrally).
"""

from __future__ import annotations

import datetime as dt

from django.db import OperationalError
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from tests.support.coordinator_harness import job_payloads, propose_and_start
from training import outbox, queues
from training.models import JobState, OutboxMessage, Round
from training.rounds import contributions, coordinator, states


def test_a_database_error_while_aggregating_hands_the_claim_back_to_the_next_tick(
    c3, broker, monkeypatch
):
    job = propose_and_start(c3, broker, rounds=1)
    real_store = states.store_state
    failures = []

    def store_once_failing(state):
        if not failures:
            failures.append(1)
            raise OperationalError("server closed the connection unexpectedly")
        return real_store(state)

    monkeypatch.setattr(states, "store_state", store_once_failing)
    broker.deliver()  # the sites upload; the last upload's round_maybe_close hits the error
    rnd = Round.objects.get(job=job, index=1)
    assert failures and rnd.state == Round.State.OPEN  # handed back, not stuck AGGREGATING
    job.refresh_from_db()
    assert job.state == JobState.RUNNING

    report = broker.run(coordinator.rounds_tick)  # the very next tick, no stale wait
    assert report.closed == [rnd.pk]
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    (closed,) = job_payloads(ledger_events.ROUND_CLOSED, job)
    assert len(closed["updates"]) == 3  # every accepted update counted, once
    assert verify_chain().ok


def test_rounds_a_dead_coordinator_never_sent_to_scoring_are_scored(c3, broker, monkeypatch):
    # The coordinator dies right after each round's commit, before it publishes the round's
    # scoring message: the message was written to the outbox with the close, so the relay (the
    # tick's backstop here) publishes it, and the scoring worker scores the round.
    real_publish = outbox._publish_committed

    def died_before_publishing_scoring(pks):
        scoring = OutboxMessage.objects.filter(pk__in=pks, task=queues.ROUND_SCORE.name)
        real_publish(sorted(set(pks) - set(scoring.values_list("pk", flat=True))))

    monkeypatch.setattr(outbox, "_publish_committed", died_before_publishing_scoring)
    job = propose_and_start(c3, broker, rounds=2)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert not job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    pending = OutboxMessage.objects.filter(task=queues.ROUND_SCORE.name, sent_at__isnull=True)
    assert pending.count() == 2

    pending.update(available_at=timezone.now() - dt.timedelta(seconds=1))  # the grace passed
    report = broker.run(coordinator.rounds_tick)
    assert report.errors == []
    assert [m["queue"] for m in broker.messages] == ["scoring", "scoring"]
    assert not job_payloads(ledger_events.CONTRIBUTION_SCORED, job)  # the tick scores nothing
    broker.deliver()
    scored = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert sorted(p["round"] for p in scored) == [1, 2]
    (total,) = job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)
    assert total["rounds"] == dict.fromkeys(sorted(s.slug for s in c3.sites), 2)
    # A second pass finds nothing left: each round and the total are recorded once.
    again = broker.run(contributions.scores_tick)
    assert again["scoring_resent"] == [] and again["totals"] == []
    assert len(job_payloads(ledger_events.CONTRIBUTION_SCORED, job)) == 2
    assert verify_chain().ok


def test_a_lost_task_is_sent_again_before_a_short_rounds_deadline(c3, broker, settings):
    # Issue 13, item 5: with a 45 s round and the default 300 s re-dispatch, a lost task used
    # to be failed with the round before it was ever sent again.
    settings.FL_REDISPATCH_AFTER_SECONDS = 300
    lost = c3.sites[0].slug
    job = propose_and_start(c3, broker, rounds=1, round_timeout_seconds=45)
    broker.deliver(drop_sites=(lost,))
    rnd = Round.objects.get(job=job, index=1)
    assert rnd.state == Round.State.OPEN
    assert broker.run(coordinator.rounds_tick, now=rnd.opened_at + dt.timedelta(seconds=20))
    assert [m for m in broker.messages if m["kwargs"].get("site") == lost] == []
    report = broker.run(coordinator.rounds_tick, now=rnd.opened_at + dt.timedelta(seconds=23))
    assert len(report.redispatched) == 1
    broker.deliver()
    rnd.refresh_from_db()
    assert rnd.state == Round.State.CLOSED
    (closed,) = job_payloads(ledger_events.ROUND_CLOSED, job)
    assert lost in closed["sites"] and closed["stragglers"] == []


# --- A coordinator killed while it aggregates (issue 13, item 2) ----------------------------------


def _die_after_claiming(monkeypatch):
    """The coordinator claims the round, then dies before it aggregates."""
    monkeypatch.setattr(coordinator, "_aggregate_and_finish", lambda round_id, token: "killed")


def test_a_round_whose_claimer_died_is_claimed_again_when_its_lease_runs_out(
    c3, broker, monkeypatch, settings
):
    settings.FL_CLAIM_LEASE_SECONDS = 30
    job = propose_and_start(c3, broker, rounds=1)
    _die_after_claiming(monkeypatch)
    broker.deliver()
    monkeypatch.undo()
    monkeypatch.setattr(coordinator.outbox.current_app, "send_task", broker.send_task)
    rnd = Round.objects.get(job=job, index=1)
    assert rnd.state == Round.State.AGGREGATING
    assert rnd.claim_token and rnd.lease_expires_at is not None

    # While the lease runs, no one else takes the round.
    within = rnd.lease_expires_at - dt.timedelta(seconds=1)
    assert broker.run(coordinator.rounds_tick, now=within).closed == []
    assert Round.objects.get(pk=rnd.pk).claim_token == rnd.claim_token

    # The first tick after it ran out claims it again and closes it: 30 s, not 600.
    after = rnd.lease_expires_at + dt.timedelta(seconds=1)
    assert (after - rnd.closed_at).total_seconds() < 35
    assert broker.run(coordinator.rounds_tick, now=after).closed == [rnd.pk]
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert Round.objects.get(pk=rnd.pk).lease_expires_at is None  # scored, then let go
    assert job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    (closed,) = job_payloads(ledger_events.ROUND_CLOSED, job)
    assert len(closed["updates"]) == 3  # counted once
    assert verify_chain().ok


def test_a_claimer_whose_lease_was_taken_over_closes_nothing(c3, broker, monkeypatch):
    job = propose_and_start(c3, broker, rounds=1)
    _die_after_claiming(monkeypatch)
    broker.deliver()
    monkeypatch.undo()
    monkeypatch.setattr(coordinator.outbox.current_app, "send_task", broker.send_task)
    rnd = Round.objects.get(job=job, index=1)
    paused_token = rnd.claim_token
    # Another coordinator takes the claim over (the first one was paused past its lease).
    new_token = coordinator._reclaim(rnd.pk, rnd.lease_expires_at + dt.timedelta(seconds=1))
    assert new_token and new_token != paused_token
    # A second coordinator finds the claim held again, under a fresh lease.
    assert coordinator._reclaim(rnd.pk, timezone.now()) is None

    # The paused one wakes up and finishes its aggregation: it closes nothing.
    assert broker.run(coordinator._aggregate_and_finish, rnd.pk, paused_token) == "not_open"
    assert Round.objects.get(pk=rnd.pk).state == Round.State.AGGREGATING
    assert not job.global_models.filter(round_index=1).exists()
    # The one holding the claim does.
    assert broker.run(coordinator._aggregate_and_finish, rnd.pk, new_token) == "closed"
    assert job.global_models.filter(round_index=1).count() == 1


def test_a_long_aggregation_renews_its_lease(c3, broker, monkeypatch, settings):
    settings.FL_CLAIM_LEASE_SECONDS = 3  # renewed every second
    job = propose_and_start(c3, broker, rounds=1)
    seen = []
    real = coordinator._aggregate_and_finish_once

    def slow(round_id, token):
        first = Round.objects.get(pk=round_id).lease_expires_at
        lease = coordinator._Lease(round_id, token)
        lease._renew_once()  # what the thread does every third of the lease
        seen.append((first, Round.objects.get(pk=round_id).lease_expires_at))
        return real(round_id, token)

    monkeypatch.setattr(coordinator, "_aggregate_and_finish_once", slow)
    broker.deliver()
    (first, renewed), *_ = seen
    assert renewed > first
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
