"""Celery tasks of the training app. Tasks take ids (and digests), not objects, and
call one service; their names and queues live in ``training.queues`` (the one registry).

The coordinator's tasks (``training.job_start``, ``training.round_maybe_close``,
``training.rounds_tick``) run on ``central``, next to the database; contribution scoring
(``training.round_score``) on ``scoring``, beside it, with a worker of its own
(``training.rounds.scoring_queue``) so that no round waits behind a score. The site task
``training.site_train`` is sent by the coordinator to ``site.<slug>`` and runs on
that site's worker, which holds no database credentials: its body calls
:func:`training.site.worker.run_site_round`, which talks to the central REST API only.
torch is imported inside the site task's training (``training.site.worker`` loads it
lazily), never when this module is imported, so CUDA cannot initialise in a worker's parent
process before it forks.

A database error in a coordinator's task (a dropped connection, a failover) is retried with
jittered back-off (:data:`RETRY_DATABASE_ERRORS`) rather than lost; the periodic tick backs every
one of them up anyway, so the retries only make recovery quicker.
"""

from celery import shared_task
from celery.exceptions import Reject
from django.conf import settings
from django.db import DatabaseError

from training import queues
from training.jobs.approvals import jobs_expire_overdue
from training.rounds import audit_pictures, contributions, coordinator
from training.site.audit import run_site_audit
from training.site.evaluation import NotEvaluatedHere, run_site_evaluation
from training.site.worker import WrongSite, run_site_round

#: Central tasks meet a database error with a retry after 1, 2, 4 … (at most 30) seconds.
RETRY_DATABASE_ERRORS = {
    "autoretry_for": (DatabaseError,),
    "retry_backoff": 1,
    "retry_backoff_max": 30,
    "retry_jitter": True,
    "max_retries": 8,
}


@shared_task(name=queues.EXPIRE_OVERDUE_JOBS.name, ignore_result=True)
def expire_overdue_jobs() -> int:
    """Expire jobs whose approval deadline passed (scheduled by Celery beat)."""
    return jobs_expire_overdue()


@shared_task(name=queues.JOB_START.name, ignore_result=True, **RETRY_DATABASE_ERRORS)
def job_start(job_id: int) -> int | None:
    """Start an approved job (queued when it becomes approved)."""
    rnd = coordinator.job_start(job_id)
    return rnd.pk if rnd is not None else None


@shared_task(name=queues.ROUND_MAYBE_CLOSE.name, ignore_result=True, **RETRY_DATABASE_ERRORS)
def round_maybe_close(round_id: int) -> str:
    """Close a round if it is done (queued after each accepted update)."""
    return coordinator.round_maybe_close(round_id)


@shared_task(name=queues.ROUNDS_TICK.name, ignore_result=True)
def rounds_tick() -> dict:
    """The coordinator's periodic pass (Celery beat)."""
    report = coordinator.rounds_tick()
    return {k: v for k, v in vars(report).items() if v}


@shared_task(
    name=queues.SITE_TRAIN.name,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.FL_SITE_TASK_SOFT_LIMIT,
    time_limit=settings.FL_SITE_TASK_HARD_LIMIT,
)
def site_train(
    *,
    job_id: int,
    round_index: int,
    site: str,
    spec_digest: str,
    start_digest: str = "",
    global_digest: str = "",
) -> dict:
    """Train this site's update for one round and upload it (runs on ``site.<slug>``).

    ``start_digest`` is the model the site starts from (the round's global model, or for a
    cyclic round the previous site's result). ``global_digest`` is its former name, still
    taken from messages queued before the rename."""
    try:
        return run_site_round(
            job_id=job_id,
            round_index=round_index,
            site=site,
            spec_digest=spec_digest,
            start_digest=start_digest or global_digest,
        )
    except WrongSite as exc:
        # A task for another site reached this worker: never run it, never requeue it here.
        raise Reject(str(exc), requeue=False) from exc


@shared_task(
    name=queues.ROUND_EVALUATION_MAYBE_CLOSE.name, ignore_result=True, **RETRY_DATABASE_ERRORS
)
def round_evaluation_maybe_close(round_id: int) -> str:
    """Close a round's evaluation at the sites if every site reported; the close sends the
    round to the scoring queue."""
    return contributions.evaluation_close_and_score(round_id)


@shared_task(
    name=queues.ROUND_SCORE.name,
    ignore_result=True,
    # Under the hard limit every task has (the broker's consumer timeout less a margin): a
    # round too slow to score is recorded as such rather than killed, delivered again and
    # killed again, holding the scoring worker each time.
    soft_time_limit=settings.CELERY_TASK_TIME_LIMIT - queues.SOFT_LIMIT_LEAD_SECONDS,
    **RETRY_DATABASE_ERRORS,
)
def round_score(round_id: int) -> str:
    """Score one closed round's contributions and record them (runs on ``scoring``; a round
    sent twice, or held by another scorer, is left alone)."""
    return contributions.round_score_claimed(round_id)


@shared_task(
    name=queues.SITE_EVALUATE.name,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.FL_SITE_TASK_SOFT_LIMIT,
    time_limit=settings.FL_SITE_TASK_HARD_LIMIT,
)
def site_evaluate(*, job_id: int, round_index: int, site: str, spec_digest: str) -> dict:
    """Evaluate a round's models on this site's validation share and report them (runs on
    ``site.<slug>``; ``training.site.evaluation``)."""
    try:
        return run_site_evaluation(
            job_id=job_id, round_index=round_index, site=site, spec_digest=spec_digest
        )
    except (WrongSite, NotEvaluatedHere) as exc:
        # Never run here, never requeued: the centre records the site as missing.
        raise Reject(str(exc), requeue=False) from exc


@shared_task(
    name=queues.SITE_AUDIT.name,
    ignore_result=True,
    acks_late=True,
    reject_on_worker_lost=True,
    soft_time_limit=settings.FL_SITE_TASK_SOFT_LIMIT,
    time_limit=settings.FL_SITE_TASK_HARD_LIMIT,
)
def site_audit(*, job_id: int, site: str, spec_digest: str) -> dict:
    """Audit this site's own update under a proposed job's pipeline and report the figures,
    signed (runs on ``site.<slug>``; ``training.site.audit``)."""
    try:
        return run_site_audit(job_id=job_id, site=site, spec_digest=spec_digest)
    except WrongSite as exc:
        raise Reject(str(exc), requeue=False) from exc


@shared_task(name=queues.AUDIT_PICTURE.name, ignore_result=True, **RETRY_DATABASE_ERRORS)
def audit_picture(*, job_id: int, spec_digest: str) -> str:
    """Draw the approvers' picture of what the audit's attacks rebuild, from public data."""
    return audit_pictures.draw_audit_picture(job_id=job_id, spec_digest=spec_digest)
