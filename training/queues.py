"""Celery task names and queues: the one registry (docs/architecture.md, "Tasks and queues").

Every sender, every ``@shared_task`` and the settings' routes and beat schedule read their
names from here, so a task cannot be renamed in one place and missed in another. A task
name is part of the wire contract between the central server and the hospitals' workers
(messages already queued carry it): never rename one that has been released.

The coordinator's tasks run on ``central``, next to the database. Contribution scoring, the
slowest central work (hundreds of coalition models evaluated per round), runs on ``scoring``,
consumed by a worker of its own, so that no round's close or dispatch waits behind a score.
Each hospital's site worker consumes only ``site.<institution slug>``: the site task is routed
by its sender (the coordinator knows the site), never by a static route.

This module imports nothing, so the settings, the site worker and every layer can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

CENTRAL_QUEUE = "central"
#: Contribution scoring's queue (``training.rounds.scoring_queue``): a worker of its own, beside
#: the database like the coordinator, so scoring a round never holds up the next round's close.
SCORING_QUEUE = "scoring"
SITE_QUEUE_PREFIX = "site."


def site_queue(institution_slug: str) -> str:
    """The queue a hospital's site worker consumes."""
    return f"{SITE_QUEUE_PREFIX}{institution_slug}"


@dataclass(frozen=True)
class TaskName:
    """One Celery task: its registered name, the queue it runs on (``None``: routed per
    message by its sender) and, for periodic tasks, Celery beat's interval in seconds."""

    name: str
    queue: str | None
    every_seconds: float | None = None
    doc: str = ""


EXPIRE_OVERDUE_JOBS = TaskName(
    "training.expire_overdue_jobs",
    CENTRAL_QUEUE,
    every_seconds=300.0,
    doc="Expire jobs whose approval deadline passed.",
)
JOB_START = TaskName(
    "training.job_start",
    CENTRAL_QUEUE,
    doc="Start an approved job: publish its initial model and open round 1.",
)
ROUND_MAYBE_CLOSE = TaskName(
    "training.round_maybe_close",
    CENTRAL_QUEUE,
    doc="Close a round if every site has reported (sent after each site's report).",
)
ROUNDS_TICK = TaskName(
    "training.rounds_tick",
    CENTRAL_QUEUE,
    every_seconds=10.0,
    doc="The coordinator's periodic pass: timeouts, lost messages, resumes.",
)
SITE_TRAIN = TaskName(
    "training.site_train",
    None,
    doc="Train one site's update for one round and upload it (on site.<slug>).",
)
ROUND_EVALUATION_MAYBE_CLOSE = TaskName(
    "training.round_evaluation_maybe_close",
    CENTRAL_QUEUE,
    doc="Close a round's evaluation at the sites if every site has reported, and send the "
    "round to be scored (sent after each site's evaluation report).",
)
ROUND_SCORE = TaskName(
    "training.round_score",
    SCORING_QUEUE,
    doc="Score one closed round's contributions and record them, or for a job evaluated at the "
    "sites ask them to evaluate its coalitions first (sent when a round or its evaluation at "
    "the sites closes, and again by the periodic tick for a round left unscored).",
)
SITE_EVALUATE = TaskName(
    "training.site_evaluate",
    None,
    doc="Evaluate a round's models on the site's validation share and report (on site.<slug>).",
)

SITE_AUDIT = TaskName(
    "training.site_audit",
    None,
    doc="Audit the site's own update under a proposed job's pipeline before approval: attack it "
    "and report the figures, signed (on site.<slug>).",
)
AUDIT_PICTURE = TaskName(
    "training.audit_picture",
    CENTRAL_QUEUE,
    doc="Draw, from a bundled public data set, what the audit's attacks rebuild under a "
    "proposed job's pipeline, for its approvers' page.",
)

TASKS: tuple[TaskName, ...] = (
    EXPIRE_OVERDUE_JOBS,
    JOB_START,
    ROUND_MAYBE_CLOSE,
    ROUNDS_TICK,
    SITE_TRAIN,
    ROUND_EVALUATION_MAYBE_CLOSE,
    ROUND_SCORE,
    SITE_EVALUATE,
    SITE_AUDIT,
    AUDIT_PICTURE,
)


def celery_task_routes() -> dict[str, dict[str, str]]:
    """``CELERY_TASK_ROUTES``: every task with a fixed queue."""
    return {task.name: {"queue": task.queue} for task in TASKS if task.queue is not None}


def celery_beat_schedule() -> dict[str, dict[str, object]]:
    """``CELERY_BEAT_SCHEDULE``: every periodic task, keyed by its name's last part with
    dashes (``expire-overdue-jobs``, ``rounds-tick``)."""
    return {
        task.name.rsplit(".", 1)[1].replace("_", "-"): {
            "task": task.name,
            "schedule": task.every_seconds,
        }
        for task in TASKS
        if task.every_seconds is not None
    }


# --- Time limits under the broker's consumer timeout ------------------------------------------
# Tasks are acknowledged late (settings: CELERY_TASK_ACKS_LATE), so a message stays unacknowledged
# while its task runs. RabbitMQ closes the channel of a consumer that holds a delivery longer
# than its ``consumer_timeout`` (30 min by default; PRECONDITION_FAILED), and Celery then gets
# the message again and runs the task a second time. RabbitMQ 3.10 has only the broker-wide
# setting (a queue's ``x-consumer-timeout`` argument is ignored: measured), so the tasks' limits
# are kept under it instead: the task's hard limit always acts first.

#: RabbitMQ's default ``consumer_timeout``, in seconds (``BROKER_CONSUMER_TIMEOUT_SECONDS``).
DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS = 1800
#: How far under the consumer timeout a hard limit must end: the delivery is older than the task
#: (the hand-off to the pool) and the acknowledgement follows the kill. RabbitMQ looks at its
#: timeouts about once a minute (a 5 s timeout closed the channel after 59 s: measured), but may
#: do so at any moment past the timeout, so the margin is counted below it, never above.
CONSUMER_TIMEOUT_MARGIN_SECONDS = 60
#: How long before its hard limit a site task is asked to stop (``SoftTimeLimitExceeded``).
SOFT_LIMIT_LEAD_SECONDS = 120


class TimeLimitError(ValueError):
    """Task time limits that do not fit under the broker's consumer timeout."""


@dataclass(frozen=True)
class TaskTimeLimits:
    """The site tasks' soft and hard limits, and the ceiling: the hard limit of every other task
    (no task may hold its message longer). Seconds."""

    soft: int
    hard: int
    ceiling: int


def task_time_limits(
    *, consumer_timeout: int, soft: int | None = None, hard: int | None = None
) -> TaskTimeLimits:
    """The limits for a broker whose consumer timeout is ``consumer_timeout`` seconds.

    Unset limits are derived: the hard limit is the ceiling (``consumer_timeout`` less
    :data:`CONSUMER_TIMEOUT_MARGIN_SECONDS`), the soft limit :data:`SOFT_LIMIT_LEAD_SECONDS`
    before the hard one. Limits that are set are checked: a hard limit above the ceiling, or a
    soft limit not below the hard one, raises :class:`TimeLimitError` saying what to change."""
    ceiling = consumer_timeout - CONSUMER_TIMEOUT_MARGIN_SECONDS
    if ceiling <= SOFT_LIMIT_LEAD_SECONDS:
        raise TimeLimitError(
            f"BROKER_CONSUMER_TIMEOUT_SECONDS={consumer_timeout} leaves no time for a task: it "
            f"must exceed {CONSUMER_TIMEOUT_MARGIN_SECONDS + SOFT_LIMIT_LEAD_SECONDS} s (it is "
            "RabbitMQ's consumer_timeout, in seconds; 1800 by default)"
        )
    if hard is None:
        hard = ceiling if soft is None else min(ceiling, soft + SOFT_LIMIT_LEAD_SECONDS)
    if hard > ceiling:
        raise TimeLimitError(
            f"FL_SITE_TASK_HARD_LIMIT={hard} s does not fit under the broker's consumer timeout: "
            f"BROKER_CONSUMER_TIMEOUT_SECONDS={consumer_timeout} s less a "
            f"{CONSUMER_TIMEOUT_MARGIN_SECONDS} s margin allows {ceiling} s at most. RabbitMQ "
            "would close the worker's channel before the task's limit and the task would run "
            "again. Lower FL_SITE_TASK_HARD_LIMIT, or raise consumer_timeout in rabbitmq.conf "
            "and BROKER_CONSUMER_TIMEOUT_SECONDS together."
        )
    if soft is None:
        soft = hard - SOFT_LIMIT_LEAD_SECONDS
    if not 0 < soft < hard:
        raise TimeLimitError(
            f"FL_SITE_TASK_SOFT_LIMIT={soft} s must be positive and below the hard limit, "
            f"FL_SITE_TASK_HARD_LIMIT={hard} s (the soft limit asks the task to stop, the hard "
            f"one ends it; the hard limit may be {ceiling} s at most, under "
            f"BROKER_CONSUMER_TIMEOUT_SECONDS={consumer_timeout} s)"
        )
    return TaskTimeLimits(soft=soft, hard=hard, ceiling=ceiling)


# --- Recovery timings ---------------------------------------------------------------------------

#: The shortest round timeout a spec may set: twice the tick, so that at least one tick falls
#: between the moment a lost site task is sent again (half the timeout, at the latest) and the
#: round's deadline (``training.rounds.coordinator.redispatch_delay``).
MIN_ROUND_TIMEOUT_SECONDS = int(2 * ROUNDS_TICK.every_seconds)


def recovery_timing_problems(
    *,
    redispatch_after: float,
    claim_lease: float,
    relay_every: float,
    heartbeat_every: float,
    outbox_stale: float,
) -> list[str]:
    """What is wrong with the coordinator's recovery settings, each in words (the settings
    refuse to start on any): timings that would make a lost message, a dead claimer or a dead
    coordinator go unnoticed or be acted on before it could be known."""
    tick = ROUNDS_TICK.every_seconds
    problems = []
    if redispatch_after < tick:
        problems.append(
            f"FL_REDISPATCH_AFTER_SECONDS={redispatch_after:g} is shorter than the periodic tick "
            f"({tick:g} s), which is what sends a lost task again: set it to {tick:g} or more"
        )
    if claim_lease < 3:
        problems.append(
            f"FL_CLAIM_LEASE_SECONDS={claim_lease:g} is too short to be renewed (every third of "
            "it, at least 1 s): set it to 3 or more (30 by default)"
        )
    if relay_every <= 0 or heartbeat_every < relay_every:
        problems.append(
            f"FL_COORDINATOR_HEARTBEAT_SECONDS={heartbeat_every:g} must be at least "
            f"FL_OUTBOX_RELAY_SECONDS={relay_every:g} (> 0): the heartbeat is written by the "
            "relay's passes"
        )
    if outbox_stale < 3 * max(heartbeat_every, relay_every, 5):
        problems.append(
            f"FL_OUTBOX_STALE_SECONDS={outbox_stale:g} would call the relay failing before it "
            f"has had three passes and its 5 s grace: set it to "
            f"{3 * max(heartbeat_every, relay_every, 5):g} or more"
        )
    return problems
