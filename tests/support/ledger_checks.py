"""Checks on what a block of work wrote to the ledger: which entries it appended, in order,
and that the chain still verifies afterwards."""

from __future__ import annotations

from contextlib import contextmanager

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry


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
