"""Checks on what a block of work wrote to the ledger: which entries it appended, in order,
and that the chain still verifies afterwards."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from django.db import connection

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry


@contextmanager
def with_ledger_guard_off() -> Iterator[None]:
    """Run the block as a database superuser who switched the ledger's triggers off.

    The tamper tests play a database administrator with every right (what the sites'
    witnesses are there to catch): ``session_replication_role = replica`` stops ordinary
    triggers, and only a superuser may set it. The application's own role cannot (see
    tests/ledger/test_ledger_database_roles.py). SQLite has no trigger: the block runs as it is.
    """
    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SHOW session_replication_role")
        (before,) = cursor.fetchone()
        cursor.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        # What it was: an enclosing block may still want the triggers off.
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('session_replication_role', %s, false)", [before])


def tamper_ledger(sql: str, params: Sequence[Any] = ()) -> None:
    """Run raw SQL against the ledger tables with the guard off (see above)."""
    with with_ledger_guard_off(), connection.cursor() as cursor:
        cursor.execute(sql, params)


def last_seq() -> int:
    """The sequence number of the newest ledger entry (0 on an empty ledger)."""
    return LedgerEntry.objects.order_by("-seq").values_list("seq", flat=True).first() or 0


@contextmanager
def ledger_records(*events: str):
    """Assert the block appends exactly ``events`` (in order) and the chain verifies."""
    mark = last_seq()
    yield
    new = list(LedgerEntry.objects.filter(seq__gt=mark).order_by("seq"))
    assert [e.event for e in new] == list(events)
    assert verify_chain().ok


class LedgerWatch:
    """Asserts which ledger entries a block of work appended, and that the chain holds.

    Made before the block; asked after it."""

    def __init__(self):
        self.before = LedgerEntry.objects.count()

    def assert_events(self, *events: str) -> list[LedgerEntry]:
        """Exactly ``events`` were appended, in order, and the chain verifies."""
        entries = list(LedgerEntry.objects.order_by("seq")[self.before :])
        assert [e.event for e in entries] == list(events)
        assert verify_chain().ok
        return entries

    def assert_one(self, event: str) -> LedgerEntry:
        """Exactly one entry, of ``event``, was appended, and the chain verifies."""
        return self.assert_events(event)[0]

    def assert_none(self):
        """Nothing was appended (the chain is not re-verified)."""
        assert LedgerEntry.objects.count() == self.before


def rewrite_ledger_consistently(seq: int, payload: dict[str, Any]) -> None:
    """Rewrite entry ``seq``'s payload as a database administrator who covers their tracks:
    recompute its hash, every later entry's ``prev_hash`` and hash, and the head, so that
    ``verify_chain`` still finds the ledger intact. Only the sites' saved checkpoints (and
    anything else kept outside the database) can tell.
    """
    from audit.ledger.canonical import canonical_json
    from audit.ledger.chain import CHAIN_COLUMNS, chain_hash, entry_canonical_text
    from audit.models import LedgerHead

    rows = list(LedgerEntry.objects.filter(seq__gte=seq).order_by("seq").values(*CHAIN_COLUMNS))
    assert rows and rows[0]["seq"] == seq, f"no entry #{seq} to rewrite"
    rows[0]["payload_text"] = canonical_json(payload)
    prev = rows[0]["prev_hash"]
    entries, head = LedgerEntry._meta.db_table, LedgerHead._meta.db_table
    for row in rows:
        text = entry_canonical_text(
            seq=row["seq"],
            event=row["event"],
            actor_id=row["actor_id_at_write"],
            actor_repr=row["actor_repr"],
            subject_type=row["subject_type"],
            subject_id=row["subject_id"],
            consortium_slug=row["consortium_slug"],
            institution_slug=row["institution_slug"],
            payload_text=row["payload_text"],
            created_at=row["created_at"],
        )
        new_hash = chain_hash(prev, text)
        tamper_ledger(
            f"UPDATE {entries} SET payload_text = %s, prev_hash = %s, entry_hash = %s "  # noqa: S608
            "WHERE seq = %s",
            [row["payload_text"], prev, new_hash, row["seq"]],
        )
        prev = new_hash
    tamper_ledger(f"UPDATE {head} SET entry_hash = %s WHERE id = 1", [prev])  # noqa: S608
    assert verify_chain().ok, "the rewrite was meant to leave the chain intact"
