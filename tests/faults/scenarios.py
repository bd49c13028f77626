"""The faults of issue 13, each injected into a job running on a :class:`FaultCluster`, shared by
the fault suite (tests/faults/test_recovery.py, which asserts) and the recovery benchmark
(benchmarks/recovery.py, which prints the figures).

Each scenario starts its own job, injects one fault at a defined point, repairs what an
operator (or systemd's ``Restart=``) would repair, waits for the job to end and returns a
:class:`Outcome`: the job, its wall time, and ``recovery``: the seconds from the repair (or,
for a fault nothing repairs, from the fault) to the job moving on (:class:`checks.Progress`).

Every fault leaves the cluster with every process running again.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from tests.faults import checks
from tests.support.fault_cluster import (
    FaultCluster,
    hold_aggregation,
    hold_table,
    site_worker_name,
    wait_until,
)
from training.models import JobState, Round, SiteUpdate, TrainingJob
from training.queues import MIN_ROUND_TIMEOUT_SECONDS

#: The job of the site-gone scenario: 2 rounds, the shortest round timeout (two ticks), 2 of 3.
SITE_GONE_SHAPE = {
    "rounds": 2,
    "round_timeout_seconds": MIN_ROUND_TIMEOUT_SECONDS,
    "min_participants": 2,
}
#: Generous ceiling on a whole job's wall time (seconds) in any scenario.
JOB_TIMEOUT = 240.0


@dataclass
class Outcome:
    name: str
    job: TrainingJob
    wall: float
    recovery: float | None = None
    notes: dict = field(default_factory=dict)


def start_job(cluster: FaultCluster, **overrides) -> TrainingJob:
    """A job over the cluster's three sites (3 rounds of logistic regression on their shares
    of the breast-cancer set, 60 s round timeout unless ``overrides`` say), proposed and
    approved: the last approval's ``job_start`` goes out through the outbox."""
    spec = {"rounds": 3, "round_timeout_seconds": 60, **overrides}
    return cluster.c3.propose_and_approve(**spec)


def ended(job: TrainingJob) -> bool:
    job.refresh_from_db()
    return job.state in (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED)


#: How long a round's scores may follow its close: the scoring worker scores it after the
#: close's commit, one round at a time (seconds, on this machine; the last round's too).
SCORING_SECONDS = 30.0


def wait_ended(
    cluster: FaultCluster,
    job: TrainingJob,
    timeout: float = JOB_TIMEOUT,
    scoring: float = SCORING_SECONDS,
) -> None:
    """Until the job has ended and (within ``scoring`` seconds more) every closed round and a
    completed job's total are scored."""
    wait_until(f"job #{job.pk} to end", lambda: ended(job), timeout=timeout, cluster=cluster)
    wait_until(
        f"job #{job.pk}'s rounds to be scored",
        lambda: checks.scored(job),
        timeout=scoring,
        cluster=cluster,
    )


def round_in(job: TrainingJob, index: int, *states: str):
    rnd = Round.objects.filter(job=job, index=index).first()
    return rnd if rnd is not None and (not states or rnd.state in states) else None


def wait_round(cluster, job, index, *states, timeout=90.0):
    return wait_until(
        f"round {index} of job #{job.pk} in {states or 'any state'}",
        lambda: round_in(job, index, *states),
        timeout=timeout,
        every=0.05,
        cluster=cluster,
    )


# --- The scenarios ------------------------------------------------------------------------------


def fault_free(cluster: FaultCluster) -> Outcome:
    started = time.monotonic()
    job = start_job(cluster)
    wait_ended(cluster, job)
    return Outcome("fault-free", job, time.monotonic() - started)


def coordinator_killed_while_round_open(cluster: FaultCluster, down_for: float = 3.0) -> Outcome:
    """kill -9 the coordinator once round 2 is open (its sites' tasks out, their uploads to
    come) and round 1 scored; start it again ``down_for`` seconds later."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 2, Round.State.OPEN)
    wait_until(
        "round 1 to be scored",
        lambda: checks.round_scored(round_in(job, 1)),
        timeout=SCORING_SECONDS,
        every=0.05,
        cluster=cluster,
    )
    cluster.kill("coordinator")
    open_at_kill = round_in(job, 2, Round.State.OPEN) is not None
    time.sleep(down_for)
    progress = checks.Progress(job, updates=False)
    progress.mark()
    cluster.start("coordinator")
    recovery = progress.wait(timeout=JOB_TIMEOUT, cluster=cluster)
    wait_ended(cluster, job)
    return Outcome(
        "coordinator killed, round open",
        job,
        time.monotonic() - started,
        recovery,
        {"open_at_kill": open_at_kill},
    )


def _park_in_aggregation(cluster: FaultCluster, job: TrainingJob, index: int) -> Round:
    """With :func:`hold_aggregation` in force: wait until the coordinator has claimed round
    ``index`` and waits inside its close."""
    rnd = wait_round(cluster, job, index, Round.State.AGGREGATING)
    wait_until(
        "the coordinator to wait inside the close",
        cluster.coordinator_parked,
        timeout=30,
        cluster=cluster,
    )
    return rnd


def coordinator_killed_while_aggregating(cluster: FaultCluster, down_for: float = 1.0) -> Outcome:
    """kill -9 the coordinator after it claimed round 1 for aggregation, before the close
    committed; start it again ``down_for`` seconds later. The round stays AGGREGATING until
    its claim's lease runs out and a tick claims it again."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 1)
    with hold_aggregation(cluster):
        rnd = _park_in_aggregation(cluster, job, 1)
        cluster.kill("coordinator")
    time.sleep(down_for)
    progress = checks.Progress(job, updates=False)
    progress.mark()
    cluster.start("coordinator")
    recovery = progress.wait(timeout=JOB_TIMEOUT, cluster=cluster)
    wait_ended(cluster, job)
    return Outcome(
        "coordinator killed, aggregating",
        job,
        time.monotonic() - started,
        recovery,
        {"round": rnd.index},
    )


def scoring_worker_killed_while_scoring(cluster: FaultCluster, down_for: float = 1.0) -> Outcome:
    """kill -9 the scoring worker while it records round 1's contribution scores (round 1
    closed, its scoring message taken); start it again ``down_for`` seconds later. The
    scores are written in a transaction of their own: a crash there leaves the round unscored
    and the round's lease held by the dead worker, unrenewed, until it runs out and the
    coordinator's tick sends the round to the scoring queue again. Parked the way
    :func:`hold_aggregation` parks a close: no ``ContributionScore`` can be inserted
    meanwhile."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 1)
    with hold_table(cluster, "training_contributionscore"):
        rnd1 = wait_round(cluster, job, 1, Round.State.CLOSED)
        wait_until(
            "the scoring worker to wait inside the scoring",
            cluster.scoring_parked,
            timeout=30,
            cluster=cluster,
        )
        cluster.kill("scoring")
    unscored = not checks.round_scored(rnd1)
    time.sleep(down_for)
    restarted = time.monotonic()
    cluster.start("scoring")
    wait_until(
        "round 1 to be scored again",
        lambda: checks.round_scored(rnd1),
        timeout=JOB_TIMEOUT,
        every=0.5,
        cluster=cluster,
    )
    recovery = time.monotonic() - restarted
    wait_ended(cluster, job)
    return Outcome(
        "scoring worker killed, scoring a closed round",
        job,
        time.monotonic() - started,
        recovery,
        {"unscored_after_kill": unscored},
    )


def coordinator_connections_terminated(cluster: FaultCluster) -> Outcome:
    """``pg_terminate_backend`` on every database connection of the coordinator while it
    aggregates round 1 (after the claim, inside the close). Nothing is restarted."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 1)
    with hold_aggregation(cluster):
        _park_in_aggregation(cluster, job, 1)
        progress = checks.Progress(job, updates=False)
        progress.mark()
        terminated = cluster.terminate_coordinator_connections()
    recovery = progress.wait(timeout=JOB_TIMEOUT, cluster=cluster)
    wait_ended(cluster, job)
    return Outcome(
        "coordinator's database connections terminated",
        job,
        time.monotonic() - started,
        recovery,
        {"terminated": len(terminated)},
    )


def broker_killed_with_task_in_flight(cluster: FaultCluster, down_for: float = 2.0) -> Outcome:
    """kill -9 Redis while the coordinator holds a task (it waits inside round 1's close, its
    message unacknowledged), start an empty Redis on the same port ``down_for`` seconds later,
    then let the task finish. The job has moved on when round 2 (whose site tasks went through
    the new, empty broker) has an accepted update."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 1)
    with hold_aggregation(cluster):
        _park_in_aggregation(cluster, job, 1)
        cluster.broker.kill()
        time.sleep(down_for)
        cluster.broker.start()
        restarted = time.monotonic()
    wait_until(
        "an update of round 2 through the new broker",
        lambda: SiteUpdate.objects.filter(
            round__job=job, round__index=2, status=SiteUpdate.Status.ACCEPTED
        ).exists(),
        timeout=JOB_TIMEOUT,
        every=0.1,
        cluster=cluster,
    )
    recovery = time.monotonic() - restarted
    wait_ended(cluster, job)
    return Outcome(
        "broker killed with a task in flight, restarted empty",
        job,
        time.monotonic() - started,
        recovery,
    )


def broker_down_during_uploads(cluster: FaultCluster, down_for: float = 4.0) -> Outcome:
    """kill -9 Redis as round 2 opens (its site tasks already delivered: the sites fetch, train
    and upload while the broker is away, and each accepted upload's request to close the round
    cannot be published), start it again, empty, ``down_for`` seconds later."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 2, Round.State.OPEN)
    wait_until(
        "round 2's tasks to reach every site",
        lambda: (
            not SiteUpdate.objects.filter(
                round__job=job, round__index=2, sent_at__isnull=True
            ).exists()
        ),
        timeout=30,
        every=0.05,
        cluster=cluster,
    )
    time.sleep(0.3)  # the relay's publish reached Redis; the sites' consumers took the tasks
    cluster.broker.kill()
    time.sleep(down_for)
    accepted_while_down = SiteUpdate.objects.filter(
        round__job=job, round__index=2, status=SiteUpdate.Status.ACCEPTED
    ).count()
    progress = checks.Progress(job, updates=False)
    progress.mark()
    cluster.broker.start()
    try:
        recovery = progress.wait(timeout=JOB_TIMEOUT, cluster=cluster)
        wait_ended(cluster, job)
    finally:
        if not ended(job) or job.state != JobState.COMPLETED:
            # A site worker wedged by the outage (alive, consuming nothing) would fail every
            # later scenario too: start the site workers again for them.
            for site in cluster.c3.sites:
                cluster.restart(site_worker_name(site.slug))
            for site in cluster.c3.sites:
                cluster.wait_ready(site_worker_name(site.slug))
    return Outcome(
        "broker down during uploads, restarted empty",
        job,
        time.monotonic() - started,
        recovery,
        {"accepted_while_down": accepted_while_down},
    )


def web_server_restarted_during_uploads(cluster: FaultCluster, down_for: float = 3.0) -> Outcome:
    """kill -9 the web server as round 2 opens (the sites fetch its model, train, wait
    ``UPLOAD_PAUSE_SECONDS`` and upload: all of it against a server that is gone), start it
    again ``down_for`` seconds later."""
    started = time.monotonic()
    job = start_job(cluster)
    wait_round(cluster, job, 2, Round.State.OPEN)
    cluster.kill("web")
    time.sleep(down_for)
    progress = checks.Progress(job)
    progress.mark()
    cluster.start("web")
    recovery = progress.wait(timeout=JOB_TIMEOUT, cluster=cluster)
    wait_ended(cluster, job)
    return Outcome("web server restarted during uploads", job, time.monotonic() - started, recovery)


def site_gone_for_good(cluster: FaultCluster, slug: str = "hospital-c") -> Outcome:
    """``slug``'s worker stopped for the whole job (2 rounds, the shortest round timeout a spec
    may set, 2 of 3 sites required). Its worker is started again afterwards, its queue emptied
    first."""
    name = site_worker_name(slug)
    cluster.stop_process(name)
    try:
        started = time.monotonic()
        job = start_job(cluster, **SITE_GONE_SHAPE)
        wait_ended(cluster, job)
        wall = time.monotonic() - started
    finally:
        cluster.broker.purge(f"site.{slug}")
        cluster.start(name)
        cluster.wait_ready(name)
    return Outcome("a site gone for good", job, wall, None, {"slug": slug})


def replayed_upload(cluster: FaultCluster, slug: str = "hospital-a") -> Outcome:
    """As round 2 opens, post ``slug``'s round-1 update (its bytes and its signature, made for
    round 1) to round 2, before the site's own round-2 upload."""
    from training.site.client import CentralClient, CentralError

    started = time.monotonic()
    job = start_job(cluster)
    rnd2 = wait_round(cluster, job, 2, Round.State.OPEN)
    earlier = SiteUpdate.objects.get(
        round__job=job, round__index=1, institution__slug=slug, status=SiteUpdate.Status.ACCEPTED
    )
    digest = earlier.update_digest
    data = (cluster.artifact_root / digest[:2] / digest[2:4] / digest).read_bytes()
    own = SiteUpdate.objects.get(round=rnd2, institution__slug=slug)
    before = own.status
    client = CentralClient(cluster.c3.site(slug).config(cluster.central_url), retry_seconds=0)
    try:
        status, body = client.upload(
            job.pk,
            2,
            data=data,
            digest=digest,
            signature=earlier.signature,
            samples=earlier.samples,
            metrics={},
            privacy_events=earlier.privacy_events,
            pipeline=earlier.pipeline,
        )
    except CentralError as exc:
        status, body = exc.status, exc.body
    wait_ended(cluster, job)
    return Outcome(
        "replayed upload",
        job,
        time.monotonic() - started,
        None,
        {
            "slug": slug,
            "status": status,
            "body": body if isinstance(body, dict) else json.loads(body or "{}"),
            "own_status_at_replay": before,
        },
    )


#: What a scenario needs beyond what both configurations have: PostgreSQL's backends to
#: terminate, a broker process (Redis) to kill. The rest run on the embedded default too.
NEEDS = {
    "coordinator-db-connections-terminated": "postgresql",
    "broker-killed-restarted-empty": "redis",
    "broker-down-during-uploads": "redis",
}


def not_applicable(cluster: FaultCluster, name: str) -> str | None:
    """Why scenario ``name`` cannot run on ``cluster`` (None when it can)."""
    need = NEEDS.get(name)
    if need == "postgresql" and cluster.vendor != "postgresql":
        return "the embedded default's SQLite has no server connections to terminate"
    if need == "redis" and cluster.broker.kind != "redis":
        return "the embedded default's broker is a folder, with no process to kill"
    return None


SCENARIOS = {
    "coordinator-killed-round-open": coordinator_killed_while_round_open,
    "coordinator-killed-aggregating": coordinator_killed_while_aggregating,
    "scoring-worker-killed-scoring": scoring_worker_killed_while_scoring,
    "coordinator-db-connections-terminated": coordinator_connections_terminated,
    "broker-killed-restarted-empty": broker_killed_with_task_in_flight,
    "broker-down-during-uploads": broker_down_during_uploads,
    "web-server-restarted": web_server_restarted_during_uploads,
    "site-gone-for-good": site_gone_for_good,
    "replayed-upload": replayed_upload,
}
