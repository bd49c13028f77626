"""The transactional outbox: messages that must follow a commit survive a broker outage.

A state change that calls for a Celery message (open a round and send the sites their tasks,
ask the coordinator to close a round, start an approved job, ask for evaluations) writes an
:class:`~training.models.OutboxMessage` row in the same transaction, with
:func:`send_after_commit`. When the transaction commits, the message is published at once (the
fast path); if the broker does not take it, the row stays pending and the relay publishes it
later, with jittered exponential back-off, until the broker does. So:

* a broker outage delays work and never drops it (before, ``transaction.on_commit`` published
  once, and one failed send raised out of the callback and dropped every send after it);
* a request never fails after its commit (an accepted upload used to be answered 500 when the
  close-the-round message could not be published);
* a message is never published for a transaction that rolled back (the row goes with it).

Several messages written by one call (a round's site tasks: :func:`send_each_after_commit`)
are published together after the commit: one read of the rows, the publishes, one write
marking them sent; one message at a time that was a read and a write (its own commit) each, so
a round opened for ten sites sent its tenth task twenty statements after its first.

Delivery is at least once: a relay killed after publishing and before marking the row sent
publishes it again. Every task of ``training.queues`` is a compare-and-set on our own rows, so
a second delivery does nothing.

Who relays: a thread in the coordinator's Celery worker
(``training.liveness.start_coordinator_thread``, started by ``consortium.celery`` when a worker
consumes the ``central`` queue), every ``FL_OUTBOX_RELAY_SECONDS``; the same thread writes the
coordinator's heartbeat. The periodic tick relays too, as a backstop for a dead thread. Two
relays may run at once (two coordinators): on PostgreSQL each claims its rows with
``SKIP LOCKED``, elsewhere a second publish is harmless.

Hand-written: the pattern is a few queries, and the libraries that offer it (for Celery,
none well kept) would bring their own tables and workers.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from dataclasses import dataclass

from celery import current_app
from django.db import connection, transaction
from django.db.models import F
from django.utils import timezone

from training.models import OutboxMessage
from training.queues import TaskName

log = logging.getLogger(__name__)

__all__ = [
    "Backlog",
    "RelayPass",
    "backlog",
    "relay_pending",
    "send_after_commit",
    "send_each_after_commit",
]

#: How long the relay leaves a new message to the fast path of the transaction that wrote it.
FAST_PATH_GRACE = dt.timedelta(seconds=5)
#: Back-off between two failed publishes of one message: full jitter under an exponential cap.
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_CAP_SECONDS = 30.0
#: Sent rows are kept this long (operators can see what went out), then deleted by the relay.
KEEP_SENT = dt.timedelta(days=1)


def send_after_commit(
    task: TaskName, *, args=(), kwargs: dict | None = None, queue: str | None = None
) -> OutboxMessage:
    """Record ``task`` in the caller's transaction, to be published once it commits.

    ``queue`` is required for tasks routed per message (the site tasks), else the task's own
    queue. Arguments are ids and digests (JSON), never tensors or patient data."""
    (message,) = send_each_after_commit(task, [(list(args), dict(kwargs or {}), queue)])
    return message


def send_each_after_commit(
    task: TaskName, messages: list[tuple[list, dict, str | None]]
) -> list[OutboxMessage]:
    """Record several messages of ``task``, each ``(args, kwargs, queue)``, in the caller's
    transaction, to be published together once it commits (in this order).

    The rows are written in one statement: a round opened for a thousand sites wrote a
    thousand, one round trip each, while the coordinator held the ledger's lock."""
    rows = []
    available_at = timezone.now() + FAST_PATH_GRACE
    for args, kwargs, queue in messages:
        queue = queue or task.queue
        if not queue:
            raise ValueError(f"{task.name} is routed per message: give its queue")
        rows.append(
            OutboxMessage(
                task=task.name, queue=queue, args=args, kwargs=kwargs, available_at=available_at
            )
        )
    # bulk_create keeps the order and sets each row's pk (PostgreSQL, and SQLite >= 3.35).
    rows = OutboxMessage.objects.bulk_create(rows)
    if rows:
        pks = [row.pk for row in rows]
        transaction.on_commit(lambda: _publish_committed(pks))
    return rows


def _publish_committed(pks: list[int]) -> None:
    """The fast path, run once the messages' transaction commits: never raises (a request
    that committed must not fail), a message the broker refused waits for the relay."""
    try:
        pending = OutboxMessage.objects.filter(pk__in=pks, sent_at__isnull=True).order_by("pk")
        _mark_sent([message.pk for message in pending if _send(message)])
    except Exception:  # noqa: BLE001 - the relay publishes whatever this could not
        log.exception("outbox messages %s are left to the relay", pks)


def _publish(message: OutboxMessage) -> bool:
    """Publish one message; on success mark it sent, on failure schedule the next attempt."""
    if not _send(message):
        return False
    _mark_sent([message.pk])
    return True


def _mark_sent(pks: list[int]) -> None:
    if pks:
        OutboxMessage.objects.filter(pk__in=pks, sent_at__isnull=True).update(
            sent_at=timezone.now(), attempts=F("attempts") + 1
        )


def _send(message: OutboxMessage) -> bool:
    """Hand one message to the broker; on failure schedule its next attempt (False)."""
    try:
        current_app.send_task(
            message.task,
            args=message.args,
            kwargs=message.kwargs,
            queue=message.queue,
            retry=False,  # our back-off, not the producer's: fail fast and let the relay wait
        )
    except Exception as exc:  # noqa: BLE001 - any broker error: try again later
        attempts = message.attempts + 1
        cap = min(BACKOFF_CAP_SECONDS, BACKOFF_FIRST_SECONDS * 2**attempts)
        delay = random.uniform(0, cap)  # noqa: S311 - jitter, not a secret
        OutboxMessage.objects.filter(pk=message.pk, sent_at__isnull=True).update(
            attempts=attempts,
            available_at=timezone.now() + dt.timedelta(seconds=max(delay, 0.5)),
            last_error=f"{type(exc).__name__}: {exc}"[:500],
        )
        log.warning(
            "could not publish %s to %s (attempt %s): %s",
            message.task,
            message.queue,
            attempts,
            exc,
            extra={"outbox_id": message.pk},
        )
        return False
    return True


@dataclass(frozen=True)
class RelayPass:
    sent: int = 0
    failed: int = 0


def relay_pending(*, limit: int = 200) -> RelayPass:
    """Publish the pending messages that are due, oldest first; stop at the first failure
    (the broker is down: the rest would fail too, each a wasted connection attempt).

    On PostgreSQL the rows are claimed with ``SKIP LOCKED`` for the pass, so two relays do
    not publish the same message; the lock is held while publishing, which is short."""
    now = timezone.now()
    sent = failed = 0
    with transaction.atomic():
        due = OutboxMessage.objects.filter(sent_at__isnull=True, available_at__lte=now).order_by(
            "pk"
        )
        if connection.features.has_select_for_update_skip_locked:
            due = due.select_for_update(skip_locked=True)
        for message in list(due[:limit]):
            if _publish(message):
                sent += 1
            else:
                failed += 1
                break
    if sent and random.random() < 0.05:  # noqa: S311 - now and then: forget a day-old send
        OutboxMessage.objects.filter(sent_at__lt=now - KEEP_SENT).delete()
    return RelayPass(sent=sent, failed=failed)


@dataclass(frozen=True)
class Backlog:
    """What waits in the outbox: for ``/health/``, ``/metrics`` and the dashboard."""

    depth: int
    oldest_age_seconds: float | None
    failing: int  # pending messages the broker has refused at least once


def backlog() -> Backlog:
    from django.db.models import Count, Min, Q

    row = OutboxMessage.objects.filter(sent_at__isnull=True).aggregate(
        depth=Count("pk"), oldest=Min("created_at"), failing=Count("pk", filter=Q(attempts__gt=0))
    )
    oldest = row["oldest"]
    age = (timezone.now() - oldest).total_seconds() if oldest is not None else None
    return Backlog(depth=row["depth"], oldest_age_seconds=age, failing=row["failing"])
