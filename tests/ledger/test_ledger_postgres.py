"""PostgreSQL-only guarantees: the triggers that make the table append-only, and
concurrent writers that must never fork the chain. Skipped on SQLite."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import DatabaseError, connection, transaction

from audit.ledger.chain import append_entry, verify_chain
from audit.models import LedgerEntry
from tests.support.child_processes import child_env, release_together
from tests.support.factories import UserFactory

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(
        not settings.DATABASE_IS_POSTGRES, reason="needs DATABASE_URL pointing at PostgreSQL"
    ),
]

ROOT = Path(__file__).resolve().parents[2]


def raw(sql: str, params=()) -> None:
    # A savepoint, so the refused statement does not break the test's transaction.
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(sql, params)


@pytest.mark.django_db
def test_trigger_refuses_update():
    entry = append_entry(event="t.one", payload={"a": 1})
    with pytest.raises(DatabaseError, match="cannot be changed"):
        raw("UPDATE audit_ledgerentry SET payload_text = '{}' WHERE id = %s", [entry.pk])
    with pytest.raises(DatabaseError, match="cannot be changed"):
        raw("UPDATE audit_ledgerentry SET seq = seq + 1000 WHERE id = %s", [entry.pk])
    with pytest.raises(DatabaseError, match="cannot be changed"), transaction.atomic():
        LedgerEntry.objects.filter(pk=entry.pk).update(actor_repr="mallory")
    entry.refresh_from_db()
    assert entry.payload_text == '{"a":1}'
    assert verify_chain().ok


@pytest.mark.django_db
def test_trigger_refuses_delete():
    entry = append_entry(event="t.one")
    with pytest.raises(DatabaseError, match="cannot be deleted"):
        raw("DELETE FROM audit_ledgerentry WHERE id = %s", [entry.pk])
    with pytest.raises(DatabaseError, match="cannot be deleted"), transaction.atomic():
        LedgerEntry.objects.all().delete()
    assert LedgerEntry.objects.filter(pk=entry.pk).exists()


@pytest.mark.django_db
def test_trigger_refuses_moving_an_entry_to_another_actor():
    author, other = UserFactory(), UserFactory()
    entry = append_entry(event="t.one", actor=author)
    with pytest.raises(DatabaseError, match="cannot be changed"):
        raw("UPDATE audit_ledgerentry SET actor_id = %s WHERE id = %s", [other.pk, entry.pk])
    # Nulling the actor together with any other column is refused too.
    with pytest.raises(DatabaseError, match="cannot be changed"):
        raw(
            "UPDATE audit_ledgerentry SET actor_id = NULL, actor_repr = 'x' WHERE id = %s",
            [entry.pk],
        )
    entry.refresh_from_db()
    assert entry.actor_id == author.pk


@pytest.mark.django_db
def test_trigger_allows_the_user_deletion_path():
    user = UserFactory(username="leaver")
    entry = append_entry(event="t.one", actor=user)
    repr_before = entry.actor_repr
    get_user_model().objects.filter(pk=user.pk).delete()
    entry.refresh_from_db()
    assert entry.actor_id is None
    assert entry.actor_repr == repr_before
    assert entry.actor_id_at_write == user.pk
    assert verify_chain().ok


CHILD = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import django
    django.setup()
    from django.db import connection
    from audit.ledger.chain import append_entry

    worker, count, start_file = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    connection.ensure_connection()          # connect before the start line
    Path(f"{start_file}.ready{worker}").touch()
    while not start_file.exists():          # the barrier: everyone starts together
        time.sleep(0.005)
    for i in range(count):
        append_entry(event="concurrency.append", payload={"worker": worker, "i": i},
                     consortium_slug="concurrency", institution_slug=f"w{worker}")
    connection.close()
    """
)


@pytest.mark.django_db(transaction=True)
def test_concurrent_writers_never_fork_the_chain(tmp_path):
    processes, per_process = 4, 60
    before = LedgerEntry.objects.count()
    start_file = tmp_path / "start"
    env = child_env()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(w), str(per_process), str(start_file)],
            cwd=ROOT,
            env=env,
        )
        for w in range(processes)
    ]
    try:
        release_together(start_file, children)
        # Verify while they write: a consistent snapshot never looks broken.
        verifications = 0
        while any(c.poll() is None for c in children):
            result = verify_chain()
            assert result.ok, result.summary()
            verifications += 1
        assert [c.wait(timeout=60) for c in children] == [0] * processes
    finally:
        for c in children:
            if c.poll() is None:
                c.kill()

    total = before + processes * per_process
    seqs = list(LedgerEntry.objects.order_by("seq").values_list("seq", flat=True))
    assert seqs == list(range(1, total + 1))
    prevs = LedgerEntry.objects.values_list("prev_hash", flat=True)
    assert len(set(prevs)) == total, "two entries chain on the same predecessor"
    per_worker = {
        f"w{w}": LedgerEntry.objects.filter(institution_slug=f"w{w}").count()
        for w in range(processes)
    }
    assert per_worker == {f"w{w}": per_process for w in range(processes)}
    # The writers really overlapped: their entries interleave.
    order = list(
        LedgerEntry.objects.filter(consortium_slug="concurrency")
        .order_by("seq")
        .values_list("institution_slug", flat=True)
    )
    switches = sum(1 for a, b in zip(order, order[1:], strict=False) if a != b)
    assert switches > processes
    result = verify_chain()
    assert result.ok, result.summary()
    assert result.entry_count == total
    assert verifications >= 1
