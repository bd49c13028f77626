"""The transactional outbox (issue 13, item 7): a message that must follow a commit is written
in the commit's own transaction and published until the broker takes it, so a broker outage
delays work and never drops it, and a request never fails after its commit.

The coordinator's jobs run through the real coordinator and site-worker code with the
in-memory broker of tests/support/coordinator_harness.py, which is made to refuse messages
the way a broker that is down does (kombu raises ``OperationalError``).
"""

from __future__ import annotations

import datetime as dt
from unittest import mock

import pytest
from django.db import transaction
from django.utils import timezone
from kombu.exceptions import OperationalError as BrokerDown

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from consortium.celery import app
from tests.support.coordinator_harness import job_payloads, propose_and_start
from training import outbox, queues
from training.models import JobState, OutboxMessage, Round, SiteUpdate
from training.rounds import coordinator


class BrokerSwitch:
    """Wraps the in-memory broker: while ``down``, every publish raises as kombu does."""

    def __init__(self, broker):
        self.broker = broker
        self.down = False
        self.refused = 0

    def send_task(self, *args, **kwargs):
        if self.down:
            self.refused += 1
            raise BrokerDown("[Errno 111] Connection refused")
        return self.broker.send_task(*args, **kwargs)


@pytest.fixture
def switch(broker, monkeypatch):
    s = BrokerSwitch(broker)
    monkeypatch.setattr(app, "send_task", s.send_task)
    return s


def _due_now():
    """Make every pending message due (the relay's back-off and grace, skipped)."""
    OutboxMessage.objects.filter(sent_at__isnull=True).update(available_at=timezone.now())


# --- The service --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_message_is_published_once_its_transaction_commits(django_capture_on_commit_callbacks):
    with (
        mock.patch.object(outbox.current_app, "send_task") as send_task,
        django_capture_on_commit_callbacks(execute=True),
        transaction.atomic(),
    ):
        message = outbox.send_after_commit(queues.ROUND_MAYBE_CLOSE, args=[7])
        send_task.assert_not_called()  # not before the commit
    send_task.assert_called_once_with(
        "training.round_maybe_close", args=[7], kwargs={}, queue="central", retry=False
    )
    message.refresh_from_db()
    assert message.sent_at is not None
    assert message.attempts == 1
    assert outbox.backlog().depth == 0


@pytest.mark.django_db
def test_a_rolled_back_transaction_sends_nothing(django_capture_on_commit_callbacks):
    with (
        mock.patch.object(outbox.current_app, "send_task") as send_task,
        django_capture_on_commit_callbacks(execute=True),
        pytest.raises(RuntimeError),
        transaction.atomic(),
    ):
        outbox.send_after_commit(queues.JOB_START, args=[1])
        raise RuntimeError("the state change failed")
    send_task.assert_not_called()
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_a_rounds_site_tasks_are_published_together_in_order(
    django_capture_on_commit_callbacks, django_assert_num_queries
):
    """One read of the messages and one write marking them sent after the commit (one of each
    per message before, each write its own commit); the site tasks leave in the given order."""
    sites = ["a", "b", "c", "d"]
    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        with django_capture_on_commit_callbacks(execute=False) as callbacks, transaction.atomic():
            outbox.send_each_after_commit(
                queues.SITE_TRAIN, [([], {"site": slug}, f"site.{slug}") for slug in sites]
            )
        send_task.assert_not_called()  # not before the commit
        (callback,) = callbacks
        with django_assert_num_queries(2):
            callback()
    assert [c.kwargs["queue"] for c in send_task.call_args_list] == [f"site.{s}" for s in sites]
    assert outbox.backlog().depth == 0
    assert set(OutboxMessage.objects.values_list("attempts", flat=True)) == {1}


@pytest.mark.django_db
def test_a_rounds_site_tasks_are_written_in_one_statement(django_assert_num_queries):
    """A round opened for many sites writes its tasks' rows in one INSERT, in order, each with
    its pk (which the publish after the commit reads them back by)."""
    sites = [f"site-{n}" for n in range(25)]
    with mock.patch.object(outbox.current_app, "send_task"), transaction.atomic():
        with django_assert_num_queries(1):
            rows = outbox.send_each_after_commit(
                queues.SITE_TRAIN, [([], {"site": slug}, f"site.{slug}") for slug in sites]
            )
        assert all(row.pk is not None for row in rows)
        stored = list(OutboxMessage.objects.order_by("pk").values_list("pk", "queue"))
    assert stored == [(row.pk, f"site.{slug}") for row, slug in zip(rows, sites, strict=True)]


@pytest.mark.django_db
def test_one_refused_message_of_a_batch_waits_and_the_others_are_sent(
    django_capture_on_commit_callbacks,
):
    refuse_b = [None, BrokerDown("Connection refused"), None]
    with (
        mock.patch.object(outbox.current_app, "send_task", side_effect=refuse_b),
        django_capture_on_commit_callbacks(execute=True),
        transaction.atomic(),
    ):
        outbox.send_each_after_commit(
            queues.SITE_TRAIN, [([], {"site": s}, f"site.{s}") for s in ["a", "b", "c"]]
        )
    pending = OutboxMessage.objects.get(sent_at__isnull=True)
    assert pending.queue == "site.b" and pending.attempts == 1
    assert pending.available_at > timezone.now()  # its back-off
    assert OutboxMessage.objects.filter(sent_at__isnull=False).count() == 2


@pytest.mark.django_db
def test_a_batch_needs_each_site_tasks_queue():
    with pytest.raises(ValueError, match="routed per message"):
        outbox.send_each_after_commit(queues.SITE_TRAIN, [([], {"site": "a"}, None)])
    assert not OutboxMessage.objects.exists()


@pytest.mark.django_db
def test_a_site_task_needs_its_queue():
    with pytest.raises(ValueError, match="routed per message"):
        outbox.send_after_commit(queues.SITE_TRAIN, kwargs={"site": "x"})


@pytest.mark.django_db
def test_a_refused_message_waits_for_the_relay_with_back_off(django_capture_on_commit_callbacks):
    with (
        mock.patch.object(
            outbox.current_app, "send_task", side_effect=BrokerDown("Connection refused")
        ),
        django_capture_on_commit_callbacks(execute=True),
    ):
        message = outbox.send_after_commit(queues.ROUND_MAYBE_CLOSE, args=[3])  # no raise
    message.refresh_from_db()
    assert message.sent_at is None
    assert message.attempts == 1
    assert message.last_error == "OperationalError: Connection refused"
    assert message.available_at > timezone.now()  # not hammered: it waits its back-off
    backlog = outbox.backlog()
    assert (backlog.depth, backlog.failing) == (1, 1)

    with mock.patch.object(outbox.current_app, "send_task") as send_task:
        assert outbox.relay_pending() == outbox.RelayPass(0, 0)  # not due yet
        _due_now()
        assert outbox.relay_pending() == outbox.RelayPass(sent=1, failed=0)
        assert outbox.relay_pending() == outbox.RelayPass(0, 0)  # once
    send_task.assert_called_once()
    message.refresh_from_db()
    assert message.sent_at is not None and message.attempts == 2


@pytest.mark.django_db
def test_the_relay_sends_oldest_first_and_stops_at_the_first_refusal():
    for index in range(4):
        OutboxMessage.objects.create(task=queues.JOB_START.name, queue="central", args=[index])
    sent = []

    def second_refused(name, args, kwargs, queue, retry):
        if len(sent) == 2:
            raise BrokerDown("gone")
        sent.append(args[0])

    with mock.patch.object(outbox.current_app, "send_task", side_effect=second_refused):
        result = outbox.relay_pending()
    assert result == outbox.RelayPass(sent=2, failed=1)
    assert sent == [0, 1]
    pending = OutboxMessage.objects.filter(sent_at__isnull=True).order_by("pk")
    assert [m.args[0] for m in pending] == [2, 3]
    assert [m.attempts for m in pending] == [1, 0]  # the rest were not even tried


# --- The coordinator through a broker outage ------------------------------------------------------


def test_a_broker_outage_while_a_round_opens_drops_no_site_task(c3, broker, switch):
    job = broker.run(c3.propose_and_approve, rounds=1)
    switch.down = True  # the start message got through; then the broker went down
    broker.deliver(only_central=True)  # job_start: the coordinator opens round 1
    assert Round.objects.filter(job=job, index=1, state=Round.State.OPEN).exists()
    assert not broker.site_tasks()
    assert switch.refused == 3  # each site's send was tried, and each refusal kept
    pending = OutboxMessage.objects.filter(sent_at__isnull=True, task=queues.SITE_TRAIN.name)
    assert sorted(m.kwargs["site"] for m in pending) == sorted(s.slug for s in c3.sites)

    switch.down = False  # the broker is back
    _due_now()
    assert outbox.relay_pending().sent == 3
    slugs = sorted(s.slug for s in c3.sites)
    assert sorted(m["kwargs"]["site"] for m in broker.site_tasks()) == slugs
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert verify_chain().ok


def test_an_accepted_upload_is_answered_when_the_broker_is_down(c3, broker, switch):
    job = propose_and_start(c3, broker, rounds=1)
    switch.down = True
    broker.deliver()  # three uploads; the last one's close-the-round message is refused
    rnd = Round.objects.get(job=job, index=1)
    assert set(rnd.updates.values_list("status", flat=True)) == {SiteUpdate.Status.ACCEPTED}
    assert rnd.state == Round.State.OPEN  # nobody was told to close it: the broker was down
    (close,) = OutboxMessage.objects.filter(task=queues.ROUND_MAYBE_CLOSE.name)
    assert close.sent_at is None and close.args == [rnd.pk]

    switch.down = False
    _due_now()
    assert outbox.relay_pending().sent == 1
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    (closed,) = job_payloads(ledger_events.ROUND_CLOSED, job)
    assert len(closed["updates"]) == 3


def test_the_tick_relays_what_a_dead_relay_left(c3, broker, switch):
    job = propose_and_start(c3, broker, rounds=1)
    switch.down = True
    broker.deliver()
    switch.down = False
    OutboxMessage.objects.filter(sent_at__isnull=True).update(
        available_at=timezone.now() - dt.timedelta(seconds=1)
    )
    broker.run(coordinator.rounds_tick)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED
    assert outbox.backlog().depth == 0
