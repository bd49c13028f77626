"""Celery task names and queues: the one registry (docs/architecture.md, "Tasks and queues").

Every sender, every ``@shared_task`` and the settings' routes and beat schedule read their
names from here, so a task cannot be renamed in one place and missed in another. A task
name is part of the wire contract between the central server and the hospitals' workers
(messages already queued carry it): never rename one that has been released.

The coordinator's tasks run on ``central``, next to the database. Each hospital's site
worker consumes only ``site.<institution slug>``: the site task is routed by its sender
(the coordinator knows the site), never by a static route.

This module imports nothing, so the settings, the site worker and every layer can read it.
"""

from __future__ import annotations

from dataclasses import dataclass

CENTRAL_QUEUE = "central"
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

TASKS: tuple[TaskName, ...] = (
    EXPIRE_OVERDUE_JOBS,
    JOB_START,
    ROUND_MAYBE_CLOSE,
    ROUNDS_TICK,
    SITE_TRAIN,
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
