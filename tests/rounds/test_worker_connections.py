"""A Celery worker keeps its PostgreSQL connection between tasks (consortium.celery).

Before, Celery's Django fix-up closed every connection before and after every task, so each
round's close, each tick and each round's scores opened a connection: a new server process,
about 7 ms of PostgreSQL's CPU each on this machine. These tests drive the same signal handlers
a worker runs around a task (ours and the fix-up's), on a real PostgreSQL connection.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import signals
from celery.fixups.django import DjangoWorkerFixup
from django.conf import settings
from django.db import connection

from consortium.celery import _workers_keep_their_database_connections, app

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not settings.DATABASE_IS_POSTGRES, reason="needs DATABASE_URL pointing at PostgreSQL"
    ),
    pytest.mark.django_db(transaction=True),  # between tasks a worker is in no transaction
]


class Task:
    """What the signals are sent with: a task, run by a worker or eagerly."""

    def __init__(self, *, eager: bool = False):
        self.request = SimpleNamespace(is_eager=eager)


A_TASK = Task()


def backend_pid() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def run_a_task_around(fixup: DjangoWorkerFixup) -> None:
    """What a worker does around a task, as far as the connections are concerned."""
    signals.task_prerun.send(sender=A_TASK, task_id="t", task=A_TASK)
    fixup.on_task_prerun(A_TASK)
    backend_pid()  # the task's queries
    signals.task_postrun.send(sender=A_TASK, task_id="t", task=A_TASK)
    fixup.on_task_postrun(A_TASK)


@pytest.fixture
def worker_settings(monkeypatch):
    """The database settings as a worker's ``celeryd_init`` leaves them (restored after)."""
    config = settings.DATABASES["default"]
    monkeypatch.setitem(config, "CONN_MAX_AGE", config.get("CONN_MAX_AGE", 0))
    connection.close()  # the next connection is opened under the worker's settings
    return config


def test_a_worker_uses_one_connection_for_many_tasks(worker_settings):
    worker_settings["CONN_MAX_AGE"] = 0  # as central.env leaves it for Daphne
    _workers_keep_their_database_connections()
    assert worker_settings["CONN_MAX_AGE"] == settings.WORKER_DATABASE_CONN_MAX_AGE > 0
    fixup = DjangoWorkerFixup(app)
    assert fixup.db_reuse_max == settings.CELERY_DB_REUSE_MAX
    first = backend_pid()
    for _ in range(5):
        run_a_task_around(fixup)
    assert backend_pid() == first


def test_with_no_reuse_every_task_gets_a_new_connection(worker_settings, settings):
    settings.WORKER_DATABASE_CONN_MAX_AGE = 0
    _workers_keep_their_database_connections()
    fixup = DjangoWorkerFixup(app)
    seen = {backend_pid()}
    for _ in range(3):
        run_a_task_around(fixup)
        seen.add(backend_pid())
    assert len(seen) == 4


def test_a_broken_connection_is_replaced_before_the_next_tasks_first_query(worker_settings):
    """The server ended the worker's backend between two tasks (a restart, an operator): the
    next task's first query does not fail, it runs on a new connection (the health check that
    ``close_old_connections`` asks for at the task's start)."""
    from django.db import connections

    _workers_keep_their_database_connections()
    fixup = DjangoWorkerFixup(app)
    run_a_task_around(fixup)
    first = backend_pid()
    other = connections.create_connection("default")
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [first])
    finally:
        other.close()
    run_a_task_around(fixup)  # its query would raise on the terminated backend
    assert backend_pid() != first


def test_an_eager_task_leaves_the_callers_connection_alone(worker_settings, settings):
    settings.WORKER_DATABASE_CONN_MAX_AGE = 0
    _workers_keep_their_database_connections()
    first = backend_pid()
    eager = Task(eager=True)
    signals.task_postrun.send(sender=eager, task_id="t", task=eager)
    assert backend_pid() == first
