"""Contribution scoring on its own queue (training/rounds/scoring_queue.py): closing a round sends
``training.round_score`` to ``scoring`` and scores nothing on the coordinator, so the next round
is dispatched (and can close) before any score exists; the scoring task scores and records each
round once; the periodic pass sends again a round left unscored once its lease runs out, never
while a scorer holds it, and never scores itself; a scoring worker killed mid-round (its lease
never let go) leads to a re-send. Jobs run through the real coordinator and site-worker code (the
in-memory broker of tests/support/coordinator_harness.py) on three hospitals holding the bundled
breast-cancer set (evaluated centrally).
"""

from __future__ import annotations

import datetime as dt

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from tests.support.coordinator_harness import job_payloads, propose_and_start
from training import queues
from training.models import ContributionScore, JobState, OutboxMessage, Round
from training.rounds import contributions, scoring_queue
from training.rounds import tasks as round_tasks

CONTRIBUTION_EVENTS = (ledger_events.CONTRIBUTION_SCORED, ledger_events.CONTRIBUTION_UNAVAILABLE)


def _entries(event, rnd):
    return list(
        LedgerEntry.objects.filter(
            event=event, subject_type="training.round", subject_id=str(rnd.pk)
        ).order_by("seq")
    )


def _recorded(rnd) -> int:
    return sum(len(_entries(event, rnd)) for event in CONTRIBUTION_EVENTS)


def _closed_without_scoring(c3, broker, monkeypatch, *, rounds=2):
    """A job run to completion with no scoring worker: its scoring messages are lost (kept in
    ``broker.lost``). Any inline scoring would go through ``round_contributions``, which fails
    here, and leave a ``contribution.unavailable`` entry behind."""
    job = propose_and_start(c3, broker, rounds=rounds)
    real = contributions.round_contributions

    def not_here(rnd):
        raise AssertionError("scored inline, not on the scoring queue")

    monkeypatch.setattr(contributions, "round_contributions", not_here)
    broker.deliver(drop_scoring=True)
    monkeypatch.setattr(contributions, "round_contributions", real)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    return job, list(job.rounds.order_by("index"))


def _resend_messages(broker):
    return [m for m in broker.messages if m["name"] == queues.ROUND_SCORE.name]


def test_closing_a_round_sends_it_to_the_scoring_queue_and_scores_nothing_inline(
    c3, broker, monkeypatch, settings
):
    settings.FL_REDISPATCH_AFTER_SECONDS = 300
    job, (rnd1, rnd2) = _closed_without_scoring(c3, broker, monkeypatch)
    # Both rounds closed, round 2 dispatched and closed, the job completed: no score anywhere.
    assert _recorded(rnd1) == _recorded(rnd2) == 0
    assert not ContributionScore.objects.exists()
    # One message per closed round, to the scoring queue, written to the outbox with the close.
    assert broker.lost == [
        {"name": "training.round_score", "args": [rnd.pk], "kwargs": {}, "queue": "scoring"}
        for rnd in (rnd1, rnd2)
    ]
    assert OutboxMessage.objects.filter(task="training.round_score", queue="scoring").count() == 2
    assert settings.CELERY_TASK_ROUTES["training.round_score"] == {"queue": "scoring"}
    # The rounds wait queued: the coordinator's claim let go, a lease as long as a message waits.
    for rnd in (rnd1, rnd2):
        assert rnd.claim_token == ""
        assert dt.timedelta(seconds=299) < rnd.lease_expires_at - rnd.closed_at
        assert rnd.lease_expires_at - rnd.closed_at < dt.timedelta(seconds=310)

    # The scoring worker takes the messages: each round is scored once, after the next round
    # was dispatched (round 2's round.opened comes before round 1's score in the ledger).
    broker.messages, broker.lost = broker.lost, []
    broker.deliver()
    (opened2,) = _entries(ledger_events.ROUND_OPENED, rnd2)
    (scored1,) = _entries(ledger_events.CONTRIBUTION_SCORED, rnd1)
    (scored2,) = _entries(ledger_events.CONTRIBUTION_SCORED, rnd2)
    assert opened2.seq < scored1.seq < scored2.seq
    assert ContributionScore.objects.filter(job=job).count() == 6
    (total,) = job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)
    assert total["rounds"] == dict.fromkeys(sorted(s.slug for s in c3.sites), 2)
    for rnd in (rnd1, rnd2):
        rnd.refresh_from_db()
        assert rnd.lease_expires_at is None  # the scorer let go
    assert verify_chain().ok


def test_the_scoring_task_scores_and_records_once(c3, broker, monkeypatch, settings):
    job, (rnd1, rnd2) = _closed_without_scoring(c3, broker, monkeypatch)
    # The Celery task itself, as the scoring worker runs it; too slow a round is recorded as
    # such before the hard limit every task has.
    assert round_tasks.round_score.soft_time_limit < settings.CELERY_TASK_TIME_LIMIT
    assert broker.run(round_tasks.round_score, rnd1.pk) == "scored"
    # A second delivery, or a re-send that arrives later: nothing more.
    assert broker.run(round_tasks.round_score, rnd1.pk) == "already"
    assert broker.run(contributions.round_score_claimed, rnd1.pk) == "already"
    assert len(_entries(ledger_events.CONTRIBUTION_SCORED, rnd1)) == 1
    assert ContributionScore.objects.filter(round=rnd1).count() == 3

    # While another scorer holds round 2 (its lease renewed), a second message leaves it be.
    token = scoring_queue.scoring_claim(rnd2.pk)
    assert token is not None
    assert scoring_queue.scoring_claim(rnd2.pk) is None
    assert broker.run(contributions.round_score_claimed, rnd2.pk) == "busy"
    assert _recorded(rnd2) == 0
    # The holder scores it; the job's total follows its last round.
    assert broker.run(contributions.round_score, rnd2.pk) == "scored"
    scoring_queue.scoring_release(rnd2.pk, token)
    assert len(job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)) == 1
    assert Round.objects.get(pk=rnd2.pk).lease_expires_at is None
    assert verify_chain().ok


def test_the_periodic_pass_sends_an_unscored_round_again_once_its_lease_ran_out(
    c3, broker, monkeypatch, settings
):
    settings.FL_REDISPATCH_AFTER_SECONDS = 60
    job, (rnd1, rnd2) = _closed_without_scoring(c3, broker, monkeypatch)
    broker.lost = []  # the messages are lost for good (a broker that came back empty)
    queued = max(rnd1.lease_expires_at, rnd2.lease_expires_at)

    # While the queued lease runs, the message may still be waiting for a busy scoring worker.
    first = min(rnd1.lease_expires_at, rnd2.lease_expires_at)
    early = broker.run(contributions.scores_tick, now=first - dt.timedelta(seconds=1))
    assert early["scoring_resent"] == [] and _resend_messages(broker) == []

    # Once it ran out, the pass sends both rounds again (and scores nothing itself).
    later = queued + dt.timedelta(seconds=1)
    outcome = broker.run(contributions.scores_tick, now=later)
    assert outcome["scoring_resent"] == [rnd1.pk, rnd2.pk]
    assert [m["args"] for m in _resend_messages(broker)] == [[rnd1.pk], [rnd2.pk]]
    assert {m["queue"] for m in _resend_messages(broker)} == {"scoring"}
    assert _recorded(rnd1) == _recorded(rnd2) == 0
    # Not at the next tick, nor the one after: each re-send waits as long as the round has
    # waited (at least FL_REDISPATCH_AFTER_SECONDS) before the next.
    for seconds in (10, 60):
        again = broker.run(contributions.scores_tick, now=later + dt.timedelta(seconds=seconds))
        assert again["scoring_resent"] == []
    rnd1.refresh_from_db()
    waited = later - rnd1.closed_at
    assert rnd1.claim_token == "" and rnd1.lease_expires_at == later + waited

    # Delivered, the re-sent messages score both rounds and the job's total, once.
    broker.deliver()
    assert _recorded(rnd1) == _recorded(rnd2) == 1
    assert len(job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)) == 1
    done = broker.run(contributions.scores_tick, now=later + 3 * waited)
    assert done["scoring_resent"] == [] and done["totals"] == []
    assert _resend_messages(broker) == []
    assert verify_chain().ok


class _Killed(BaseException):
    """SIGKILL: nothing after it runs in the process, no ``finally`` included."""


def test_a_scoring_worker_killed_mid_round_leads_to_a_resend(c3, broker, monkeypatch, settings):
    settings.FL_CLAIM_LEASE_SECONDS = 30
    job = propose_and_start(c3, broker, rounds=1)
    # The scoring worker takes the round's message and is killed while it scores: it took the
    # round's lease and never lets it go.
    real_score, real_release = contributions.round_score, scoring_queue.scoring_release

    def killed(round_id):
        raise _Killed()

    monkeypatch.setattr(contributions, "round_score", killed)
    monkeypatch.setattr(scoring_queue, "scoring_release", lambda round_id, token: None)
    with pytest.raises(_Killed):
        broker.deliver()
    monkeypatch.setattr(contributions, "round_score", real_score)
    monkeypatch.setattr(scoring_queue, "scoring_release", real_release)
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED  # the job never waited for its scores
    rnd = Round.objects.get(job=job, index=1)
    assert rnd.claim_token and rnd.lease_expires_at is not None  # the dead scorer's
    assert _recorded(rnd) == 0

    # While its lease runs: the message delivered again (the broker's own redelivery) leaves
    # the round to its holder, and the periodic pass sends nothing.
    within = rnd.lease_expires_at - dt.timedelta(seconds=1)
    assert broker.run(contributions.round_score_claimed, rnd.pk, now=within) == "busy"
    assert broker.run(contributions.scores_tick, now=within)["scoring_resent"] == []
    assert _resend_messages(broker) == []
    # Unrenewed, the lease runs out within FL_CLAIM_LEASE_SECONDS: the round is sent again.
    after = rnd.lease_expires_at + dt.timedelta(seconds=1)
    assert (after - rnd.closed_at).total_seconds() < 40
    assert broker.run(contributions.scores_tick, now=after)["scoring_resent"] == [rnd.pk]
    broker.deliver()
    assert len(_entries(ledger_events.CONTRIBUTION_SCORED, rnd)) == 1
    assert _recorded(rnd) == 1
    (total,) = job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)
    assert total["rounds"] == dict.fromkeys(sorted(s.slug for s in c3.sites), 1)
    assert verify_chain().ok
