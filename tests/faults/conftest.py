"""The fault suite's cluster (tests/support/fault_cluster.py): one consortium of three hospitals
with real processes (web server, coordinator, beat, three site workers) on PostgreSQL and a
throwaway Redis, shared by the scenarios of a module. Each scenario runs a job of its own on it
and leaves every process running again, so sharing it is honest: what a scenario asserts is
about its own job (and the whole ledger, which must verify throughout).

The consortium outlives one test, so its rows are written with the database unblocked for the
module (not in a test's transaction: the cluster's processes must see them) and flushed at the
module's end, as pytest-django does after a transactional test.

Marked ``faults``. Needs PostgreSQL (``DATABASE_URL``; the embedded SQLite test database lives
in this process's memory, where no other process can reach it) and ``redis-server``; skipped,
saying which is missing, unless ``FAULTS_REQUIRED`` is set (``.ci/run`` sets it in its
PostgreSQL pass): then it fails.
"""

from __future__ import annotations

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import setup_databases, teardown_databases

from tests.support.fault_cluster import (
    FaultCluster,
    build_cast,
    point_this_process_at,
    start_cluster,
)
from tests.support.fl_harness import make_consortium3
from tests.support.redis_server import RedisServer, faults_required, redis_binary


def missing_service() -> str | None:
    if connection.vendor != "postgresql":
        return (
            "runs on PostgreSQL only (DATABASE_URL names none): the cluster's processes cannot "
            "reach the embedded SQLite test database"
        )
    if redis_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


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
    redis = RedisServer(root / "redis")
    undo = None
    built: FaultCluster | None = None
    try:
        with django_db_blocker.unblock():
            c3 = make_consortium3(build_cast(), root)
            redis.start()
            undo = point_this_process_at(redis)
            built = start_cluster(root, c3, redis)
        yield built
    finally:
        if built is not None:
            built.stop()
        redis.stop()
        if undo is not None:
            undo()
        with django_db_blocker.unblock():
            call_command("flush", interactive=False, verbosity=0)


@pytest.fixture
def faults(cluster, django_db_blocker):
    """The cluster, every process running, with the database open to the test (autocommit:
    what the test writes, the cluster's processes see)."""
    if not cluster.redis.running():
        cluster.redis.start()
    for name, proc in cluster.procs.items():
        if not proc.alive():
            cluster.start(name)
            cluster.wait_ready(name)
    cluster.logs_at_start = cluster.log_sizes()
    with django_db_blocker.unblock():
        yield cluster
