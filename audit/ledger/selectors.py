"""Reads of the ledger: every query of ``LedgerEntry`` / ``LedgerHead`` outside the chain itself.

The reports (``audit.reports``), the ledger's page and its API read entries only through these
functions, so what "the ledger up to a head" means (the entries with ``seq <= head``, in seq
order) is written once. The chain's own walk (``audit.ledger.chain``) stays where it is: it is
the one reader that must see every column in the hashed order.

Nothing here imports an app: only the ledger's models and the ledger package itself.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterable, Iterator
from typing import Any, NamedTuple

from django.db import transaction
from django.db.models import Max, QuerySet

from audit.ledger import events as ledger_events
from audit.ledger.chain import CHAIN_COLUMNS
from audit.models import LedgerEntry, LedgerHead

_events_lock = threading.Lock()
#: consortium slug -> (the highest seq looked at, its entry hash, the event names up to it)
_events_seen: dict[str, tuple[int, str, frozenset[str]]] = {}


class EntryStamp(NamedTuple):
    """What identifies one entry as a head: its hash and its time."""

    entry_hash: str
    created_at: dt.datetime


class EntryRow(NamedTuple):
    """The columns a report reads from one entry (the payload as stored, not parsed)."""

    seq: int
    event: str
    institution_slug: str
    created_at: dt.datetime
    payload_text: str


class ExportRecord(NamedTuple):
    """The entry recording a report's export: who exported the file, and when."""

    seq: int
    actor_repr: str
    created_at: dt.datetime


# --- Lists for the pages and the API ------------------------------------------------------------


def consortium_entries(consortium_slug: str) -> QuerySet[LedgerEntry]:
    """A consortium's entries (unordered: the caller filters and orders them)."""
    return LedgerEntry.objects.filter(consortium_slug=consortium_slug)


def entries_of_consortia(consortium_slugs: Iterable[str]) -> QuerySet[LedgerEntry]:
    """The entries of several consortia (the API's scope: the ones the user may read)."""
    return LedgerEntry.objects.filter(consortium_slug__in=list(consortium_slugs))


def consortium_entries_after(consortium_slug: str, seq: int) -> QuerySet[LedgerEntry]:
    """A consortium's entries after ``seq`` (a live page catching up; the (consortium, seq)
    index serves it)."""
    return LedgerEntry.objects.filter(consortium_slug=consortium_slug, seq__gt=seq)


def entries_about(subject_type: str, subject_id: str) -> QuerySet[LedgerEntry]:
    """The entries about one object (``subject_type`` is its model label), in seq order: a
    job page's history (the subject index serves it)."""
    return LedgerEntry.objects.filter(subject_type=subject_type, subject_id=subject_id).order_by(
        "seq"
    )


def subjects_recorded(
    event_names: Iterable[str], subject_type: str, subject_ids: Iterable[str]
) -> set[str]:
    """Which of ``subject_ids`` already have an entry of one of ``event_names``: what a
    writer that must record something once per object (a round's scores) has done."""
    return set(
        LedgerEntry.objects.filter(
            event__in=list(event_names),
            subject_type=subject_type,
            subject_id__in=list(subject_ids),
        ).values_list("subject_id", flat=True)
    )


def ledger_event_names(consortium_slug: str) -> list[str]:
    """The event names in a consortium's entries, sorted, for the ledger page's filter.

    ``SELECT DISTINCT event`` reads every entry of the consortium (70 ms at 100,000 entries on
    SQLite, on every page view). The ledger is append-only, so the set only grows: each process
    remembers what it has seen up to a sequence number and reads only the entries after it,
    through the (consortium, seq) index. The remembered entry's hash is checked first: a
    database that was reset or rolled back (a test's) starts the count again. Exact.
    """
    with _events_lock:
        remembered = _events_seen.get(consortium_slug, (0, "", frozenset()))
    seen_seq, seen_hash, names = remembered
    if seen_seq and not LedgerEntry.objects.filter(seq=seen_seq, entry_hash=seen_hash).exists():
        seen_seq, names = 0, frozenset()
    newer = LedgerEntry.objects.filter(consortium_slug=consortium_slug, seq__gt=seen_seq)
    head: int | None = newer.aggregate(head=Max("seq"))["head"]
    if head is None:
        return sorted(names)
    upto = newer.filter(seq__lte=head)
    names = names | set(upto.values_list("event", flat=True).distinct())
    head_hash = LedgerEntry.objects.filter(seq=head).values_list("entry_hash", flat=True).first()
    with _events_lock:
        current = _events_seen.get(consortium_slug, (0, "", frozenset()))
        # Replace what this call started from (even a stale, higher one), or anything older.
        if head_hash and (current is remembered or current[0] <= head):
            _events_seen[consortium_slug] = (head, head_hash, frozenset(names))
    return sorted(names)


# --- Heads ----------------------------------------------------------------------------------------


def current_head_seq() -> int:
    """The seq of the ledger's current head (0 for an empty ledger)."""
    seq = LedgerHead.objects.filter(pk=1).values_list("seq", flat=True).first()
    return int(seq or 0)


def entry_stamp(seq: int) -> EntryStamp | None:
    """The hash and time of entry ``seq``, or None when the ledger has no such entry."""
    row = LedgerEntry.objects.filter(seq=seq).values_list("entry_hash", "created_at").first()
    if row is None:
        return None
    return EntryStamp(row[0], row[1])


def entry_count() -> int:
    """How many entries the ledger holds."""
    return LedgerEntry.objects.count()


def entry_count_up_to(seq: int) -> int:
    """How many entries the ledger holds up to and including ``seq``."""
    return LedgerEntry.objects.filter(seq__lte=seq).count()


def chain_rows_up_to(seq: int, *, chunk_size: int = 5000) -> Iterator[tuple[Any, ...]]:
    """The entries from the first up to ``seq``, in the columns and order that
    :func:`audit.ledger.chain.verify_rows` walks, streamed."""
    return (
        LedgerEntry.objects.filter(seq__lte=seq)
        .order_by("seq")
        .values_list(*CHAIN_COLUMNS)
        .iterator(chunk_size=chunk_size)
    )


# --- What the entries record ----------------------------------------------------------------------


def subject_first_consortium(subject_type: str, subject_id: str) -> str | None:
    """The consortium named by the first entry about a subject (``training.trainingjob``, "5"),
    or None when no entry records it."""
    slug = (
        LedgerEntry.objects.filter(subject_type=subject_type, subject_id=subject_id)
        .order_by("seq")
        .values_list("consortium_slug", flat=True)
        .first()
    )
    return slug or None


def institution_consortia(institution_slug: str, consortium_slug: str | None = None) -> list[str]:
    """The consortia (sorted slugs) whose ``institution.created`` entries name the institution;
    only ``consortium_slug``'s when it is given."""
    entries = LedgerEntry.objects.filter(
        event=ledger_events.INSTITUTION_CREATED, institution_slug=institution_slug
    )
    if consortium_slug:
        entries = entries.filter(consortium_slug=consortium_slug)
    return sorted(set(entries.values_list("consortium_slug", flat=True)))


def consortium_entry_rows(
    consortium_slug: str, *, up_to: int, events: Iterable[str], chunk_size: int
) -> Iterator[EntryRow]:
    """A consortium's entries of ``events`` up to entry ``up_to``, in ledger order, as one
    chunked pass (``iterator()``): memory does not grow with the ledger's length.

    One transaction per pass: on PostgreSQL the server-side cursor needs no WITH HOLD copy of
    the result, and the pass reads one snapshot.
    """
    rows = (
        LedgerEntry.objects.filter(
            consortium_slug=consortium_slug, seq__lte=up_to, event__in=list(events)
        )
        .order_by("seq")
        .values_list("seq", "event", "institution_slug", "created_at", "payload_text")
    )
    with transaction.atomic(using=LedgerEntry.objects.db):
        for seq, event, institution, created_at, text in rows.iterator(chunk_size):
            yield EntryRow(seq, event, institution, created_at, text)


class InstitutionNamingRow(NamedTuple):
    """An ``institution.created`` or ``institution.updated`` entry: who the institution is."""

    event: str
    institution_slug: str
    subject_id: str
    payload_text: str


def institution_naming_rows(consortium_slug: str, *, up_to: int) -> Iterator[InstitutionNamingRow]:
    """A consortium's ``institution.created`` and ``institution.updated`` entries up to entry
    ``up_to``, in ledger order: the names (and the primary keys, the entries' subject) of its
    institutions as the ledger knew them at that entry."""
    rows = (
        LedgerEntry.objects.filter(
            consortium_slug=consortium_slug,
            seq__lte=up_to,
            event__in=[ledger_events.INSTITUTION_CREATED, ledger_events.INSTITUTION_UPDATED],
        )
        .order_by("seq")
        .values_list("event", "institution_slug", "subject_id", "payload_text")
    )
    for row in rows.iterator(chunk_size=500):
        yield InstitutionNamingRow(*row)


def event_payloads(consortium_slug: str, event: str, *, up_to: int) -> Iterator[tuple[int, str]]:
    """(seq, payload text) of a consortium's ``event`` entries up to entry ``up_to``, in
    ledger order, streamed."""
    entries = LedgerEntry.objects.filter(
        event=event, consortium_slug=consortium_slug, seq__lte=up_to
    ).order_by("seq")
    return entries.values_list("seq", "payload_text").iterator()


def export_recording(sha256: str) -> ExportRecord | None:
    """The first ``report.exported`` entry whose payload names the file digest ``sha256``."""
    row = (
        LedgerEntry.objects.filter(
            event=ledger_events.REPORT_EXPORTED, payload_text__contains=sha256
        )
        .order_by("seq")
        .values_list("seq", "actor_repr", "created_at")
        .first()
    )
    if row is None:
        return None
    return ExportRecord(row[0], row[1], row[2])
