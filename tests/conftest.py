"""Shared fixtures: a consortium with two institutions and one user per role.

``cast`` gives the people every permission test runs as: anonymous, outsider
(signed in, no membership), ``other_member`` (researcher at the *other*
institution), ``approver``, ``steward``, ``inst_admin`` and ``researcher`` of
``hospital_a``, ``auditor`` and ``admin`` of the consortium; and, made on first use, the
superusers ``superuser`` (the operator, member of nothing) and ``superuser_admin`` (the
consortium's administrator and a superuser), answered as the outsider and the administrator.
"""

import pytest

from tests.support.cast import make_cast
from tests.support.factories import PASSWORD


@pytest.fixture(autouse=True, scope="session")
def _flush_past_the_ledger_guard():
    """Let the test runner empty the database between transactional tests.

    On PostgreSQL the ledger's triggers refuse TRUNCATE, which is how Django flushes; the
    runner is a superuser and flushes with triggers off, as only a superuser may
    (``session_replication_role``). Nothing else in the tests gets this.
    """
    from django.db.backends.postgresql.operations import DatabaseOperations

    real_flush = DatabaseOperations.execute_sql_flush

    def flush_with_triggers_off(self, sql_list):
        with self.connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = replica")
        try:
            real_flush(self, sql_list)
        finally:
            with self.connection.cursor() as cursor:
                cursor.execute("SET session_replication_role = DEFAULT")

    DatabaseOperations.execute_sql_flush = flush_with_triggers_off
    yield
    DatabaseOperations.execute_sql_flush = real_flush


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.AXES_ENABLED = False


@pytest.fixture(autouse=True)
def _checkpoint_of_every_head(settings):
    """A site is served the head it asks after, however recently the last one was signed:
    the tests write entries and look at the checkpoint within the same second. The interval
    itself is tested in tests/ledger/test_checkpoint_service.py; processes the tests start
    (the deployment's, the benchmarks') run with the default."""
    settings.LEDGER_CHECKPOINT_SECONDS = 0


@pytest.fixture
def cast(db):
    return make_cast()


@pytest.fixture
def password():
    return PASSWORD
