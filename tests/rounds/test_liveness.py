"""Heartbeats of the central processes and what they say (issue 13, "Liveness"): the
coordinator's thread relays the outbox and beats; a dead coordinator, a stopped beat and a
stuck outbox each read as down, in words."""

from __future__ import annotations

import datetime as dt
import time
from unittest import mock

import pytest
from django.utils import timezone

from training import liveness, outbox, queues
from training.models import OutboxMessage, ServiceHeartbeat


def _status(name, now=None):
    return next(s for s in liveness.service_statuses(now) if s.name == name)


@pytest.mark.django_db
def test_a_heartbeat_is_one_row_per_process_refreshed_in_place():
    liveness.record_heartbeat(liveness.COORDINATOR, interval_seconds=5, detail={"a": 1})
    first = ServiceHeartbeat.objects.get()
    liveness.record_heartbeat(liveness.COORDINATOR, interval_seconds=5, detail={"a": 2})
    again = ServiceHeartbeat.objects.get()
    assert again.pk == first.pk
    assert again.last_seen_at >= first.last_seen_at
    assert again.started_at == first.started_at
    assert again.detail == {"a": 2}
    assert again.instance.endswith(f":{again.pid}")


@pytest.mark.django_db
def test_a_coordinator_is_dead_after_three_missed_beats():
    liveness.record_heartbeat(liveness.COORDINATOR, interval_seconds=5)
    seen = ServiceHeartbeat.objects.get().last_seen_at
    assert _status("coordinator", seen + dt.timedelta(seconds=15)).ok
    late = _status("coordinator", seen + dt.timedelta(seconds=16))
    assert not late.ok
    assert late.summary == "no coordinator heard from for 16 s"
    # Two coordinators: one alive is enough.
    ServiceHeartbeat.objects.create(
        component=liveness.COORDINATOR,
        instance="other:1",
        interval_seconds=5,
        last_seen_at=seen + dt.timedelta(seconds=10),
    )
    assert _status("coordinator", seen + dt.timedelta(seconds=16)).ok


@pytest.mark.django_db
def test_the_relay_is_down_when_a_message_waits_too_long(settings):
    settings.FL_OUTBOX_STALE_SECONDS = 60
    assert _status("relay").summary == "nothing waits to be sent"
    message = OutboxMessage.objects.create(task=queues.JOB_START.name, queue="central", args=[1])
    assert _status("relay").ok
    OutboxMessage.objects.filter(pk=message.pk).update(
        created_at=timezone.now() - dt.timedelta(seconds=61)
    )
    relay = _status("relay")
    assert not relay.ok
    assert "is the broker or the coordinator down?" in relay.summary


@pytest.mark.django_db(transaction=True)
def test_the_coordinators_thread_relays_the_outbox_and_beats(settings):
    settings.FL_OUTBOX_RELAY_SECONDS = 0.05
    settings.FL_COORDINATOR_HEARTBEAT_SECONDS = 0.2
    message = OutboxMessage.objects.create(
        task=queues.ROUND_MAYBE_CLOSE.name, queue="central", args=[5]
    )
    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        thread = liveness.start_coordinator_thread()
        try:
            assert liveness.start_coordinator_thread() is thread  # once per process
            # Watch the broker, not the database, while the thread writes: the SQLite test
            # database lives in memory with a shared cache, where a read here meets the
            # thread's write as a table lock at once ("database table is locked"), which fails
            # the thread's pass after it published, and the next pass publishes again (the
            # outbox delivers at least once; a deployed database has no such lock).
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not send_task.called:
                time.sleep(0.05)
        finally:
            # The pass under way finishes first: its message marked sent, its heartbeat written.
            liveness.stop_coordinator_thread()
    assert not thread.is_alive()
    message.refresh_from_db()
    assert message.sent_at is not None
    send_task.assert_called_once_with(
        "training.round_maybe_close", args=[5], kwargs={}, queue="central", retry=False
    )
    beat = ServiceHeartbeat.objects.get(component=liveness.COORDINATOR)
    assert beat.detail["relay_sent"] in (0, 1)
    assert _status("coordinator").ok
