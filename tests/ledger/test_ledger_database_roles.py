"""The ledger against the database's own users: every bypass of issue 16, run as the
application's role (what the server connects as) and as a role someone granted every DML
right on the ledger by mistake; both refused. Then the application's role still does its work.
PostgreSQL only (SQLite has no roles); the roles are the cluster's, made and removed here."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import psycopg2
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command
from django.db import connection

from audit.ledger.chain import append_entry, verify_chain
from audit.ledger.database_roles import RoleSetupError, grant_app_role
from audit.models import LedgerEntry, LedgerHead
from tests.support.child_processes import ROOT, child_env

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not settings.DATABASE_IS_POSTGRES, reason="needs DATABASE_URL pointing at PostgreSQL"
    ),
    pytest.mark.django_db(transaction=True),
]

APP_ROLE = "fl_test_ledger_app"
CARELESS_ROLE = "fl_test_ledger_careless"  # every DML right on the ledger, granted by mistake
TRIGGER_NAMES = "{audit.LedgerEntry:ledger_no_update,audit.LedgerEntry:ledger_no_delete}"


def _owner_sql(*statements: str) -> None:
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)


def _drop_role(role: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role])
        if cursor.fetchone():
            cursor.execute(f'DROP OWNED BY "{role}"')
            cursor.execute(f'DROP ROLE "{role}"')


@pytest.fixture
def roles():
    for role in (APP_ROLE, CARELESS_ROLE):
        _drop_role(role)
        _owner_sql(f'CREATE ROLE "{role}" LOGIN')
    call_command("grant_app_role", APP_ROLE, verbosity=0)
    grant_app_role(connection, CARELESS_ROLE)
    _owner_sql(
        f'GRANT ALL ON audit_ledgerentry TO "{CARELESS_ROLE}"',
        f'GRANT ALL ON audit_ledgerhead TO "{CARELESS_ROLE}"',
    )
    yield
    for role in (APP_ROLE, CARELESS_ROLE):
        _drop_role(role)


def _session(role: str):
    s = connection.settings_dict
    conn = psycopg2.connect(
        host=s.get("HOST") or "127.0.0.1",
        port=s.get("PORT") or 5432,
        dbname=s["NAME"],
        user=role,
    )
    return conn


def _refused(role: str, *statements: str, params=None) -> str:
    """Run ``statements`` in one transaction as ``role``; return the error that stopped them."""
    conn = _session(role)
    try:
        with conn.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement, params)
        conn.commit()
    except psycopg2.Error as error:
        conn.rollback()
        return str(error)
    finally:
        conn.close()
    raise AssertionError(f"{role} was allowed: {statements}")


def _chain(n: int = 4) -> list[LedgerEntry]:
    return [append_entry(event="test.role", payload={"i": i}) for i in range(n)]


def _unchanged(entries: list[LedgerEntry], head: LedgerHead) -> None:
    rows = list(LedgerEntry.objects.order_by("seq").values_list("seq", "payload_text"))
    assert rows == [(e.seq, e.payload_text) for e in entries]
    now = LedgerHead.objects.get(pk=1)
    assert (now.seq, now.entry_hash) == (head.seq, head.entry_hash)
    assert verify_chain().ok


def test_the_application_role_cannot_rewrite_the_ledger(roles):
    entries = _chain()
    head = LedgerHead.objects.get(pk=1)
    last, middle = entries[-1].seq, entries[1].seq
    denied = "permission denied"
    # The pgtrigger session switch, then a delete: no right to delete at all.
    said = _refused(
        APP_ROLE,
        f"SELECT set_config('pgtrigger.ignore', '{TRIGGER_NAMES}', false)",
        f"DELETE FROM audit_ledgerentry WHERE seq = {middle}",
    )
    assert denied in said
    assert denied in _refused(APP_ROLE, "TRUNCATE audit_ledgerentry")
    assert denied in _refused(APP_ROLE, "TRUNCATE audit_ledgerhead")
    assert denied in _refused(
        APP_ROLE, f"UPDATE audit_ledgerentry SET payload_text = '{{}}' WHERE seq = {middle}"
    )
    # Only the head's owner may switch or drop its triggers; only a superuser may turn off
    # every trigger of the session.
    for statement in (
        "ALTER TABLE audit_ledgerentry DISABLE TRIGGER ALL",
        "ALTER TABLE audit_ledgerentry DISABLE TRIGGER audit_ledger_entry_guard",
        "DROP TRIGGER audit_ledger_entry_guard ON audit_ledgerentry",
        "DROP TRIGGER audit_ledger_head_guard ON audit_ledgerhead",
        "CREATE OR REPLACE FUNCTION audit_ledger_entry_guard() RETURNS trigger "
        "LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$",
    ):
        said = _refused(APP_ROLE, statement)
        assert "must be owner" in said or "permission denied" in said, (statement, said)
    assert "permission denied" in _refused(APP_ROLE, "SET session_replication_role = replica")
    assert denied in _refused(APP_ROLE, "CREATE TEMP TABLE audit_ledgerhead (id int)")
    assert denied in _refused(APP_ROLE, "CREATE TABLE public.shadow (id int)")
    # The head: back one step, forward to an entry that does not exist, deleted, duplicated.
    said = _refused(APP_ROLE, "UPDATE audit_ledgerhead SET seq = seq - 1")
    assert "only move one step forward" in said
    said = _refused(
        APP_ROLE, f"UPDATE audit_ledgerhead SET seq = seq + 1, entry_hash = '{'e' * 64}'"
    )
    assert "no entry with that number and hash" in said
    assert denied in _refused(APP_ROLE, "DELETE FROM audit_ledgerhead")
    assert denied in _refused(APP_ROLE, "INSERT INTO audit_ledgerhead VALUES (2, 0, 'x')")
    # An entry that does not chain on the head.
    said = _refused(
        APP_ROLE,
        "INSERT INTO audit_ledgerentry (seq, prev_hash, entry_hash, event, actor_repr, "
        "subject_type, subject_id, consortium_slug, institution_slug, payload_text, created_at) "
        f"VALUES ({last + 1}, '{'a' * 64}', '{'b' * 64}', 'x', 'x', '', '', '', '', '{{}}', now())",
    )
    assert "does not chain on the head" in said
    _unchanged(entries, head)


def test_the_triggers_hold_against_a_role_with_every_dml_right(roles):
    entries = _chain()
    head = LedgerHead.objects.get(pk=1)
    middle = entries[1].seq
    said = _refused(
        CARELESS_ROLE,
        f"SELECT set_config('pgtrigger.ignore', '{TRIGGER_NAMES}', false)",
        f"DELETE FROM audit_ledgerentry WHERE seq = {middle}",
    )
    assert "cannot be deleted" in said
    assert "cannot be truncated" in _refused(CARELESS_ROLE, "TRUNCATE audit_ledgerentry")
    assert "cannot be truncated" in _refused(CARELESS_ROLE, "TRUNCATE audit_ledgerhead")
    said = _refused(
        CARELESS_ROLE, f"UPDATE audit_ledgerentry SET payload_text = '{{}}' WHERE seq = {middle}"
    )
    assert "cannot be changed" in said
    assert "cannot be deleted" in _refused(CARELESS_ROLE, "DELETE FROM audit_ledgerhead")
    said = _refused(CARELESS_ROLE, "INSERT INTO audit_ledgerhead VALUES (2, 0, 'x')")
    assert "can only be created once" in said
    # A wipe with the head reset (the "intact: 0 entries" case of the issue).
    said = _refused(
        CARELESS_ROLE,
        "UPDATE audit_ledgerhead SET seq = 0, entry_hash = repeat('0', 64)",
    )
    assert "only move one step forward" in said
    _unchanged(entries, head)


APP_AT_WORK = textwrap.dedent(
    """
    import django
    django.setup()
    from django.contrib.auth import get_user_model
    from audit.ledger.chain import append_entry, verify_chain
    from audit.models import LedgerEntry

    user = get_user_model().objects.create(username="leaver")
    entry = append_entry(event="test.role", actor=user, payload={"by": "app"})
    append_entry(event="test.role", payload={"then": "more"})
    user.delete()  # the one UPDATE the ledger allows: its actor set to NULL
    entry.refresh_from_db()
    assert entry.actor_id is None and entry.actor_id_at_write is not None
    result = verify_chain()
    assert result.ok, result.reason
    print("app ok", result.entry_count)
    """
)


def test_the_application_role_does_its_work(roles):
    _chain(2)
    env = child_env()
    env["DATABASE_URL"] = env["DATABASE_URL"].replace(
        f"//{connection.settings_dict['USER']}@", f"//{APP_ROLE}@", 1
    )
    assert APP_ROLE in env["DATABASE_URL"]
    done = subprocess.run(
        [sys.executable, "-c", APP_AT_WORK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "app ok 4" in done.stdout


def test_grant_refuses_roles_that_could_switch_the_triggers_off(roles):
    with pytest.raises(CommandError, match="the role running this command"):
        call_command("grant_app_role", connection.settings_dict["USER"])
    with pytest.raises(CommandError, match="no database role named"):
        call_command("grant_app_role", "fl_test_nobody_by_this_name")
    _owner_sql(
        "CREATE TABLE role_test_owned (id int)",
        f'ALTER TABLE role_test_owned OWNER TO "{APP_ROLE}"',
    )
    try:
        with pytest.raises(RoleSetupError, match="may disable or drop the ledger's triggers"):
            grant_app_role(connection, APP_ROLE)
    finally:
        _owner_sql("DROP TABLE role_test_owned")
    _drop_role("fl_test_ledger_super")
    _owner_sql('CREATE ROLE "fl_test_ledger_super" SUPERUSER')
    try:
        with pytest.raises(RoleSetupError, match="is a superuser"):
            grant_app_role(connection, "fl_test_ledger_super")
    finally:
        _drop_role("fl_test_ledger_super")
