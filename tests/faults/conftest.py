"""The fault suite's cluster (tests/support/fault_cluster.py): one consortium of three hospitals
with real processes (web server, coordinator, beat, three site workers), shared by the scenarios
of a module, on what the suite runs on: PostgreSQL (``DATABASE_URL``) with a throwaway Redis,
or the embedded default, a SQLite file with the filesystem broker. Each scenario runs a job of
its own on it and leaves every process running again, so sharing it is honest: what a scenario
asserts is about its own job (and the whole ledger, which must verify throughout).

The consortium outlives one test, so its rows are written with the database unblocked for the
module (not in a test's transaction: the cluster's processes must see them) and flushed at the
module's end, as pytest-django does after a transactional test.

On the embedded default, pytest's SQLite test database lives in this process's memory, where
no other process can reach it: the module's cluster gets a file copy of it (sqlite3's backup,
schema and all), and this process's ``default`` connection points at the copy while the module
runs (:func:`sqlite_file_database`), so what the test reads is what the cluster wrote.

Marked ``faults``. On PostgreSQL it needs ``redis-server``; skipped, saying so, unless
``FAULTS_REQUIRED`` is set (``.ci/run`` sets it in both passes): then it fails.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection, connections
from django.test.utils import setup_databases, teardown_databases

from tests.support.fault_cluster import (
    Broker,
    FaultCluster,
    build_cast,
    point_this_process_at,
    start_cluster,
)
from tests.support.filesystem_broker import FilesystemBroker
from tests.support.fl_harness import make_consortium3
from tests.support.redis_server import RedisServer, faults_required, redis_binary


def embedded_default() -> bool:
    return connection.vendor == "sqlite"


def missing_service() -> str | None:
    if not embedded_default() and redis_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


@contextlib.contextmanager
def sqlite_file_database(path: Path) -> Iterator[str]:
    """This process's SQLite test database copied to ``path``, and the ``default`` connection
    pointed at the copy until the block ends (the in-memory original, kept open by its own
    wrapper, is untouched and back afterwards). Yields the copy's ``DATABASE_URL``."""
    original = connections["default"]
    original.ensure_connection()
    with contextlib.closing(sqlite3.connect(path)) as target:
        original.connection.backup(target)
    copy = original.__class__({**original.settings_dict, "NAME": str(path)}, "default")
    connections["default"] = copy
    try:
        yield f"sqlite:///{path}"
    finally:
        copy.close()
        connections["default"] = original


@contextlib.contextmanager
def cluster_backing(root: Path) -> Iterator[tuple[Broker, str | None]]:
    """The broker and database URL of the module's cluster: the filesystem broker and a SQLite
    file on the embedded default, a throwaway Redis and the test database on PostgreSQL."""
    if embedded_default():
        with sqlite_file_database(root / "cluster.sqlite3") as url:
            yield FilesystemBroker(root / "broker"), url
    else:
        yield RedisServer(root / "redis"), None


@pytest.fixture(scope="session")
def fault_database(django_db_setup, django_db_blocker):
    """The test database. pytest-django makes it only when a collected test is marked
    ``django_db``, and the fault suite's tests are not (each would be flushed at its end, and
    the cluster's consortium with it): run on their own, they make it here."""
    with django_db_blocker.unblock():
        reason = missing_service()
        if reason is not None:
            if faults_required():
                pytest.fail(f"FAULTS_REQUIRED is set but {reason}")
            pytest.skip(reason)
        made = None
        if connection.settings_dict["NAME"] != connection.creation._get_test_db_name():
            made = setup_databases(verbosity=0, interactive=False, aliases={"default"})
    yield
    if made is not None:
        with django_db_blocker.unblock():
            teardown_databases(made, verbosity=0)


@pytest.fixture(scope="module")
def cluster(fault_database, django_db_blocker, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with contextlib.ExitStack() as stack:
        with django_db_blocker.unblock():
            broker, database_url = stack.enter_context(cluster_backing(root))
        undo = None
        built: FaultCluster | None = None
        try:
            with django_db_blocker.unblock():
                c3 = make_consortium3(build_cast(), root)
                broker.start()
                undo = point_this_process_at(broker)
                built = start_cluster(root, c3, broker, database_url=database_url)
            yield built
        finally:
            if built is not None:
                built.stop()
            broker.stop()
            if undo is not None:
                undo()
            if database_url is None:
                with django_db_blocker.unblock():
                    call_command("flush", interactive=False, verbosity=0)


@pytest.fixture
def faults(cluster, django_db_blocker):
    """The cluster, every process running, with the database open to the test (autocommit:
    what the test writes, the cluster's processes see)."""
    if not cluster.broker.running():
        cluster.broker.start()
    for name, proc in cluster.procs.items():
        if not proc.alive():
            cluster.start(name)
            cluster.wait_ready(name)
    cluster.logs_at_start = cluster.log_sizes()
    with django_db_blocker.unblock():
        yield cluster
