"""Recovery under faults (issue 13), with real processes: the web server, the coordinator, beat
and three site workers, on PostgreSQL and a Redis of the test's own, or on the embedded default
(a SQLite file and the filesystem broker), whichever the suite runs on (tests/faults/conftest.py).
The scenarios that need PostgreSQL's server connections or a broker process say so and are
skipped on the embedded default (:data:`tests.faults.scenarios.NEEDS`).

Each scenario runs a job of its own through one fault (tests/faults/scenarios.py) and asserts
what issue 13 asks of every fault (tests/faults/checks.py): every accepted update counted once,
in its round; every closed round scored; the job completed (or failed with its reason); the
ledger verifies; and the job moved on again within a bound made of the tick interval, the
aggregation claim's lease, the retries' back-off and a process's start-up -- never the 600 s
stale timeout.
"""

from __future__ import annotations

import pytest

from tests.faults import checks, scenarios
from tests.support.fault_cluster import LEASE_SECONDS, TICK_SECONDS
from training.models import JobState, Round, SiteUpdate

pytestmark = [pytest.mark.faults]

#: A Celery worker or Daphne starting (imports, Django, the broker) on a loaded 2-core machine.
STARTUP_SECONDS = 30.0
#: kombu's reconnect back-off (2, 4, 6... s), the outbox relay's and the site client's retries.
BACKOFF_SECONDS = 20.0
#: The stale timeout the bounds must stay clear of (``FL_AGGREGATION_STALE_SECONDS``).
STALE_SECONDS = 600.0


def _applicable(cluster, name: str) -> None:
    reason = scenarios.not_applicable(cluster, name)
    if reason is not None:
        pytest.skip(f"not applicable on this configuration: {reason}")


def _sound(outcome, *, expect=JobState.COMPLETED, cluster=None):
    checks.assert_job_sound(outcome.job, expect=expect)
    if cluster is not None:
        assert not cluster.dead(), f"processes died: {cluster.dead()}\n{cluster.tails()}"
        # Issue 13, item 7: no request fails on the server's side, whatever the fault.
        errors = cluster.server_errors(since=cluster.logs_at_start)
        assert errors == [], "the web server answered 5xx:\n" + "\n".join(errors)
    print(
        f"\n{outcome.name}: job #{outcome.job.pk} {outcome.job.state} in {outcome.wall:.1f} s"
        + (f", moved on {outcome.recovery:.1f} s after the repair" if outcome.recovery else "")
    )


def _all_rounds_have_every_site(job, sites=3):
    for rnd in job.rounds.order_by("index"):
        accepted = rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED).count()
        assert accepted == sites, (
            f"round {rnd.index}: {accepted} of {sites} updates accepted: "
            f"{list(rnd.updates.values_list('institution__slug', 'status', 'reject_reason'))}"
        )


def test_a_job_without_faults(faults):
    """The baseline: the cluster runs a job through, every site in every round."""
    outcome = scenarios.fault_free(faults)
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)


def test_coordinator_killed_while_a_round_is_open(faults):
    """The uploads that arrive while it is dead are kept; restarted, it closes the round
    (from the queued messages, else at its next tick) and the job goes on."""
    outcome = scenarios.coordinator_killed_while_round_open(faults)
    assert outcome.notes["open_at_kill"], "round 2 had closed before the kill: nothing tested"
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    assert outcome.recovery <= STARTUP_SECONDS + 2 * TICK_SECONDS < STALE_SECONDS


def test_coordinator_killed_while_it_aggregates(faults):
    """The round it claimed stays AGGREGATING only until the claim's lease runs out: the next
    tick claims it again and closes it, once."""
    outcome = scenarios.coordinator_killed_while_aggregating(faults)
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    assert outcome.recovery <= STARTUP_SECONDS + LEASE_SECONDS + 2 * TICK_SECONDS < STALE_SECONDS


def test_scoring_worker_killed_while_it_scores_a_closed_round(faults):
    """Issue 13, item 3, with scoring on its own queue: a scoring worker killed between a
    round's close and its scores leaves the round unscored only until the coordinator's tick
    sends it to the scoring queue again: the scorer holds the round's lease while it scores, so
    a dead one costs the lease and a tick; the job's total follows."""
    outcome = scenarios.scoring_worker_killed_while_scoring(faults)
    assert outcome.notes["unscored_after_kill"], "round 1 was scored before the kill"
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    bound = STARTUP_SECONDS + LEASE_SECONDS + 2 * TICK_SECONDS
    assert outcome.recovery <= bound, (
        f"round 1 was scored again {outcome.recovery:.0f} s after the restart, past "
        f"{bound:.0f} s (start-up + lease + 2 ticks)"
    )


def test_coordinator_database_connections_terminated(faults):
    """A dropped connection inside the close hands the claim back; the coordinator lives on
    and the next tick closes the round."""
    _applicable(faults, "coordinator-db-connections-terminated")
    coordinator = faults.procs["coordinator"]
    starts = coordinator.starts
    outcome = scenarios.coordinator_connections_terminated(faults)
    assert outcome.notes["terminated"] >= 1, "the coordinator had no connection to terminate"
    _sound(outcome, cluster=faults)
    assert coordinator.alive() and coordinator.starts == starts, "the coordinator exited"
    _all_rounds_have_every_site(outcome.job)
    assert outcome.recovery <= 2 * TICK_SECONDS + BACKOFF_SECONDS < STALE_SECONDS


def test_broker_killed_with_a_task_in_flight_and_restarted_empty(faults):
    """Issue 13, item 1: the coordinator holds a task when Redis dies; Redis comes back empty.
    The coordinator must survive (no ``Unrecoverable error``), reconnect, and the job finish:
    what the empty broker lost is sent again from the outbox and by the tick."""
    _applicable(faults, "broker-killed-restarted-empty")
    coordinator = faults.procs["coordinator"]
    starts = coordinator.starts
    outcome = scenarios.broker_killed_with_task_in_flight(faults)
    log = coordinator.text()
    assert "Unrecoverable error" not in log, log[-6000:]
    assert coordinator.alive() and coordinator.starts == starts, "the coordinator exited"
    _sound(outcome, cluster=faults)
    assert outcome.recovery <= 2 * BACKOFF_SECONDS + 2 * TICK_SECONDS < STALE_SECONDS


def test_broker_down_during_uploads(faults):
    """Issue 13, item 7: uploads accepted while the broker is away are answered 200 (their
    request to close the round waits in the outbox), never 500; the round closes once the
    broker is back, empty."""
    _applicable(faults, "broker-down-during-uploads")
    outcome = scenarios.broker_down_during_uploads(faults)
    assert outcome.notes["accepted_while_down"] >= 1, "no upload came while the broker was down"
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    assert outcome.recovery <= 2 * BACKOFF_SECONDS + 2 * TICK_SECONDS < STALE_SECONDS


def test_web_server_restarted_during_uploads(faults):
    """Issue 13, item 4: the sites retry their fetches and uploads with back-off; no site
    loses its round to a short outage of the web server."""
    outcome = scenarios.web_server_restarted_during_uploads(faults)
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    assert outcome.recovery <= STARTUP_SECONDS + BACKOFF_SECONDS < STALE_SECONDS


def test_a_site_gone_for_good(faults):
    """With 2 of 3 sites required, the job completes without the site whose worker is gone;
    the site is a straggler in every round, in the rows and in the ledger."""
    outcome = scenarios.site_gone_for_good(faults)
    _sound(outcome, cluster=faults)
    slug = outcome.notes["slug"]
    for rnd in outcome.job.rounds.order_by("index"):
        assert rnd.state == Round.State.CLOSED
        mine = rnd.updates.get(institution__slug=slug)
        assert mine.status == SiteUpdate.Status.STRAGGLER, (rnd.index, mine.status)
        (closed,) = checks.entries("round.closed", rnd)
        assert closed["stragglers"] == [slug]
        assert len(closed["sites"]) == 2
        # Each round waited out its timeout, then at most a tick: not the stale timeout.
        took = (rnd.closed_at - rnd.opened_at).total_seconds()
        timeout = scenarios.SITE_GONE_SHAPE["round_timeout_seconds"]
        assert took <= timeout + 2 * TICK_SECONDS, f"round {rnd.index} took {took:.1f} s"


def test_a_replayed_upload(faults):
    """Issue 13, item 6: an earlier round's signed update posted to this round is refused with
    409 ``replayed_update`` and recorded nowhere; the site's genuine upload is accepted."""
    outcome = scenarios.replayed_upload(faults)
    assert outcome.notes["status"] == 409, outcome.notes
    assert outcome.notes["body"].get("code") == "replayed_update", outcome.notes
    _sound(outcome, cluster=faults)
    _all_rounds_have_every_site(outcome.job)
    slug = outcome.notes["slug"]
    own = outcome.job.rounds.get(index=2).updates.get(institution__slug=slug)
    assert own.status == SiteUpdate.Status.ACCEPTED and own.reject_reason == ""
    rejections = [
        u
        for u in SiteUpdate.objects.filter(round__job=outcome.job)
        if checks.entries("round.update_rejected", u)
    ]
    assert rejections == [], "the replay was recorded as a rejection"
