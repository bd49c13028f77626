"""Appending to and verifying the hash chain (docs/architecture.md, section 5).

``entry_hash = sha256(prev_hash || canonical_json(fields))`` where ``fields`` are
the stored column values (the payload as its stored canonical text, never a
JSON field read back: PostgreSQL's jsonb reorders keys). The first entry chains
on 64 zeros.

Services call :func:`append_entry` inside their own ``transaction.atomic()`` so
that a governance change and its entry commit together or not at all.

Why one module: the writer and the checker of the chain must agree on one formula (the
canonical text, the hash, the head's move), and each has a fast path beside its plain one
(the single-statement append on PostgreSQL, the batched walk) that is held to the same
definition; apart, a change to the formula could reach one side and not the other.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.ledger import fast_walk, live
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.ledger.events import Event
from audit.models import LedgerEntry, LedgerHead

if TYPE_CHECKING:  # for the annotations only (the actor is the project's user model)
    from django.contrib.auth.models import User
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.models import Field, Model

# json.dumps(..., ensure_ascii=False) encodes every str with this function.
_enc = json.encoder.encode_basestring

GENESIS_HASH = "0" * 64
SYSTEM_ACTOR = "system"

#: One stored entry as verification reads it: the values of CHAIN_COLUMNS, in that order.
ChainRow = tuple[int, str, str, str, int | None, str, str, str, str, str, str, dt.datetime]

# The columns, in the order verification reads them.
CHAIN_COLUMNS = (
    "seq",
    "prev_hash",
    "entry_hash",
    "event",
    "actor_id_at_write",
    "actor_repr",
    "subject_type",
    "subject_id",
    "consortium_slug",
    "institution_slug",
    "payload_text",
    "created_at",
)


#: The database columns behind CHAIN_COLUMNS (``actor_id_at_write`` is its own column).
_CHAIN_DB_COLUMNS: tuple[str, ...] = tuple(
    cast("Field[Any, Any]", LedgerEntry._meta.get_field(name)).column for name in CHAIN_COLUMNS
)


def format_timestamp(value: dt.datetime) -> str:
    """UTC, microseconds, fixed width: the same text on SQLite and PostgreSQL."""
    if value.tzinfo is not dt.UTC:
        value = value.astimezone(dt.UTC)
    if value.year < 1000:  # strftime's %Y does not pad such years; keep its text
        return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    # isoformat is several times faster than strftime and gives the same text.
    return value.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def entry_canonical_text(
    *,
    seq: int,
    event: str,
    actor_id: int | None,
    actor_repr: str,
    subject_type: str,
    subject_id: str,
    consortium_slug: str,
    institution_slug: str,
    payload_text: str,
    created_at: dt.datetime,
) -> str:
    """``canonical_json`` of the entry's fields, without building the dict.

    Verification calls this once per entry, so it writes the sorted-key object
    directly with json's own (C) string encoder: the text is byte-identical to
    ``canonical_json({...})`` (a test holds it to that), several times faster.
    """
    if type(seq) is not int or not (actor_id is None or type(actor_id) is int):
        return _entry_canonical_text_slow(
            seq=seq,
            event=event,
            actor_id=actor_id,
            actor_repr=actor_repr,
            subject_type=subject_type,
            subject_id=subject_id,
            consortium_slug=consortium_slug,
            institution_slug=institution_slug,
            payload_text=payload_text,
            created_at=created_at,
        )
    return (
        f'{{"actor":{_enc(actor_repr)},'
        f'"actor_id":{"null" if actor_id is None else actor_id},'
        f'"consortium":{_enc(consortium_slug)},'
        f'"created_at":"{format_timestamp(created_at)}",'
        f'"event":{_enc(event)},'
        f'"institution":{_enc(institution_slug)},'
        f'"payload":{_enc(payload_text)},'
        f'"seq":{seq},'
        f'"subject_id":{_enc(subject_id)},'
        f'"subject_type":{_enc(subject_type)}}}'
    )


def _entry_canonical_text_slow(
    *,
    seq: int,
    event: str,
    actor_id: int | None,
    actor_repr: str,
    subject_type: str,
    subject_id: str,
    consortium_slug: str,
    institution_slug: str,
    payload_text: str,
    created_at: dt.datetime,
) -> str:
    """The definition: what :func:`entry_canonical_text` must equal."""
    return canonical_json(
        {
            "seq": seq,
            "event": event,
            "actor_id": actor_id,
            "actor": actor_repr,
            "subject_type": subject_type,
            "subject_id": subject_id,
            "consortium": consortium_slug,
            "institution": institution_slug,
            "payload": payload_text,
            "created_at": format_timestamp(created_at),
        }
    )


def chain_hash(prev_hash: str, canonical_text: str) -> str:
    return sha256_hex(prev_hash + canonical_text)


def describe_actor(user: User | None) -> str:
    """A readable actor string that stays meaningful after the user is deleted."""
    if user is None:
        return SYSTEM_ACTOR
    full_name = user.get_full_name() if hasattr(user, "get_full_name") else ""
    label = f"{full_name} ({user.get_username()})" if full_name else user.get_username()
    return f"{label} #{user.pk}"


def _locked_head() -> LedgerHead:
    connection = transaction.get_connection(LedgerHead.objects.db)
    if connection.vendor == "postgresql" and _FAST_APPEND:
        # A plain statement: compiling the ORM query costs as much as running it.
        with connection.cursor() as cursor:
            cursor.execute(_LOCK_HEAD_SQL)
            row = cursor.fetchone()
        if row is not None:
            return LedgerHead(pk=1, seq=row[0], entry_hash=row[1])
    head = LedgerHead.objects.select_for_update().filter(pk=1).first()
    if head is not None:
        return head
    try:
        with transaction.atomic():
            LedgerHead.objects.create(pk=1)
    except IntegrityError:
        pass  # another writer created it first
    return LedgerHead.objects.select_for_update().get(pk=1)


def lock_chain() -> LedgerHead:
    """Take the ledger's head lock now, in the caller's transaction, and return the head.

    Every append takes it anyway; a service that will also lock other rows
    (a job, institutions) takes this first, so all writers lock in one order
    (the chain, then the rows) and cannot deadlock each other.

    The head returned may be handed to :func:`append_entry` (``locked_head``) by a caller
    whose next append is its first since: the append then does not read the head again, a
    round trip fewer while the lock, which every writer waits for, is held.
    """
    if not transaction.get_connection(LedgerHead.objects.db).in_atomic_block:
        raise RuntimeError("lock_chain() must be called inside transaction.atomic()")
    return _locked_head()


# Set to False to append through the ORM on PostgreSQL too (the benchmark compares).
_FAST_APPEND = True
_LOCK_HEAD_SQL = (
    f'SELECT "seq", "entry_hash" FROM "{LedgerHead._meta.db_table}" '  # noqa: S608
    'WHERE "id" = 1 FOR UPDATE'
)
_INSERT_COLUMNS = (
    "seq",
    "prev_hash",
    "entry_hash",
    "event",
    "actor_id",
    "actor_id_at_write",
    "actor_repr",
    "subject_type",
    "subject_id",
    "consortium_slug",
    "institution_slug",
    "payload_text",
    "created_at",
)


@functools.cache
def _append_sql_for(quote: Callable[[str], str]) -> str:
    columns = ", ".join(quote(c) for c in _INSERT_COLUMNS)
    placeholders = ", ".join(["%s"] * len(_INSERT_COLUMNS))
    # Only quoted table and column names are interpolated; values go as parameters.
    return (
        f"WITH new AS (INSERT INTO {quote(LedgerEntry._meta.db_table)} ({columns}) "  # noqa: S608
        f"VALUES ({placeholders}) RETURNING {quote('id')}) "
        f"UPDATE {quote(LedgerHead._meta.db_table)} SET {quote('seq')} = %s, "
        f"{quote('entry_hash')} = %s WHERE {quote('id')} = 1 AND {quote('seq')} = %s "
        f"RETURNING (SELECT {quote('id')} FROM new)"
    )


def _append_sql(connection: BaseDatabaseWrapper) -> str:
    return _append_sql_for(connection.ops.quote_name)


def _insert_and_move_head(connection: BaseDatabaseWrapper, entry: LedgerEntry) -> None:
    """PostgreSQL: insert the entry and move the head in one statement.

    One round trip fewer per append than ``save()`` then ``update()``; with the
    head lock, BEGIN and COMMIT that is four instead of five. Runs in the
    caller's transaction, after the head row was locked. The head moves only from the
    entry's predecessor (``seq - 1``), else nothing is returned and it raises.
    """
    sql = _append_sql(connection)
    params = [getattr(entry, c) for c in _INSERT_COLUMNS]
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, entry.seq, entry.entry_hash, entry.seq - 1])
        row = cursor.fetchone()
    if row is None:
        raise _HeadMoved(entry.seq - 1)
    entry.pk = row[0]
    entry._state.adding = False
    entry._state.db = connection.alias


class _HeadMoved(IntegrityError):
    def __init__(self, expected_seq: int):
        super().__init__(
            f"the ledger head is not at #{expected_seq}, where this append was chained: a head "
            "handed to append_entry() was stale (another append since lock_chain())"
        )


def append_entry(
    *,
    event: str,
    actor: User | None = None,
    actor_repr: str | None = None,
    payload: dict[str, Any] | None = None,
    subject: Model | None = None,
    consortium_slug: str = "",
    institution_slug: str = "",
    locked_head: LedgerHead | None = None,
) -> LedgerEntry:
    """Append one entry, chained on the current head, in the caller's transaction.

    ``locked_head``: the head :func:`lock_chain` returned in this transaction, when every
    append since went through it (it is moved along with each); the head is then not read
    again. A stale one (an append that did not go through it) is refused: the head moves only
    from the entry's predecessor, else this raises ``IntegrityError`` (on PostgreSQL the
    entries' trigger refuses the row first, ``InternalError``) and, having no savepoint,
    leaves the caller's whole transaction to roll back.

    ``event`` is one of :mod:`audit.ledger.events`' constants, whose schema the payload is
    checked against (:class:`~audit.ledger.events.EventPayloadError` before anything is
    written); a plain string is written unchecked, for tools and tests that plant entries.

    ``subject`` is the model instance the entry is about (its model label and pk
    are recorded). ``payload`` must be JSON-serialisable without floats' NaN;
    convert decimals and datetimes to strings before passing them.
    """
    if isinstance(event, Event):  # the product's writers: the payload must match its schema
        event.check(payload or {})
    event = str(event)
    payload_text = canonical_json(payload or {})
    subject_type = subject._meta.label_lower if subject is not None else ""
    subject_id = str(subject.pk) if subject is not None else ""
    actor_id = actor.pk if actor is not None else None
    actor_text = actor_repr or describe_actor(actor)
    # No savepoint: a failed append must roll back the caller's whole transaction (nothing it
    # recorded may commit without its entry), and a savepoint costs two more round trips.
    with transaction.atomic(savepoint=False):
        head = locked_head if locked_head is not None else _locked_head()
        seq = head.seq + 1
        created_at = timezone.now()
        text = entry_canonical_text(
            seq=seq,
            event=event,
            actor_id=actor_id,
            actor_repr=actor_text,
            subject_type=subject_type,
            subject_id=subject_id,
            consortium_slug=consortium_slug,
            institution_slug=institution_slug,
            payload_text=payload_text,
            created_at=created_at,
        )
        entry_hash = chain_hash(head.entry_hash, text)
        entry = LedgerEntry(
            seq=seq,
            prev_hash=head.entry_hash,
            entry_hash=entry_hash,
            event=event,
            actor=actor,
            actor_id_at_write=actor_id,
            actor_repr=actor_text,
            subject_type=subject_type,
            subject_id=subject_id,
            consortium_slug=consortium_slug,
            institution_slug=institution_slug,
            payload_text=payload_text,
            created_at=created_at,
        )
        connection = transaction.get_connection(LedgerEntry.objects.db)
        if connection.vendor == "postgresql" and _FAST_APPEND:
            _insert_and_move_head(connection, entry)
        else:
            entry.save(force_insert=True)
            if not LedgerHead.objects.filter(pk=1, seq=seq - 1).update(
                seq=seq, entry_hash=entry_hash
            ):
                raise _HeadMoved(seq - 1)
        head.seq, head.entry_hash = seq, entry_hash  # a held head moves with the chain
        groups = live.groups_for(consortium_slug, (payload or {}).get("job_id"))
        if groups:
            transaction.on_commit(functools.partial(live.announce, groups, seq))
    return entry


@dataclass(frozen=True)
class VerificationResult:
    """What a walk over the chain found. ``first_bad_seq`` is None when intact."""

    ok: bool
    entry_count: int
    head_hash: str
    first_bad_seq: int | None = None
    reason: str = ""

    def summary(self) -> str:
        if self.ok:
            return f"Ledger intact: {self.entry_count} entries, head {self.head_hash}"
        return f"Ledger BROKEN at entry #{self.first_bad_seq}: {self.reason}"


def _rows(chunk_size: int) -> Iterator[ChainRow]:
    # iterator() streams (a server-side cursor on PostgreSQL, fetchmany on
    # SQLite): memory stays flat however long the chain is.
    return (
        LedgerEntry.objects.order_by("seq")
        .values_list(*CHAIN_COLUMNS)
        .iterator(chunk_size=chunk_size)
    )


def verify_rows(rows: Iterable[ChainRow]) -> VerificationResult:
    """Walk rows (in ``CHAIN_COLUMNS`` order, by seq) and check every link."""
    expected_prev = GENESIS_HASH
    expected_seq = 1
    count = 0
    text_of = entry_canonical_text
    sha256 = hashlib.sha256
    for (
        seq,
        prev_hash,
        entry_hash,
        event,
        actor_id,
        actor_repr,
        subject_type,
        subject_id,
        consortium_slug,
        institution_slug,
        payload_text,
        created_at,
    ) in rows:
        if seq != expected_seq:
            reason = (
                f"expected entry #{expected_seq} next but found #{seq}: "
                "an entry is missing or out of order"
            )
            return VerificationResult(False, count, expected_prev, expected_seq, reason)
        if prev_hash != expected_prev:
            reason = "its prev_hash does not match the hash of the entry before it"
            return VerificationResult(False, count, expected_prev, seq, reason)
        text = text_of(
            seq=seq,
            event=event,
            actor_id=actor_id,
            actor_repr=actor_repr,
            subject_type=subject_type,
            subject_id=subject_id,
            consortium_slug=consortium_slug,
            institution_slug=institution_slug,
            payload_text=payload_text,
            created_at=created_at,
        )
        # Same bytes as chain_hash(prev_hash, text), without the joined copy.
        digest = sha256(prev_hash.encode())
        digest.update(text.encode())
        if digest.hexdigest() != entry_hash:
            reason = "its stored hash does not match its content (the entry was altered)"
            return VerificationResult(False, count, expected_prev, seq, reason)
        expected_prev = entry_hash
        expected_seq += 1
        count += 1
    return VerificationResult(True, count, expected_prev)


def _check_head(result: VerificationResult, head_seq: int, head_hash: str) -> VerificationResult:
    """Compare the end of an intact walk with the recorded head."""
    if (head_seq, head_hash) == (result.entry_count, result.head_hash):
        return result
    count = result.entry_count
    if head_seq > count:
        first_bad = count + 1
        reason = (
            f"the recorded head is entry #{head_seq} ({head_hash[:12]}...) but the chain "
            f"ends at #{count}: entries after #{count} were deleted"
        )
    elif head_seq < count:
        first_bad = head_seq + 1
        reason = (
            f"the chain goes on to #{count} but the recorded head is entry #{head_seq}: "
            f"entries after #{head_seq} were added outside append_entry"
        )
    else:
        first_bad = count
        reason = (
            f"the recorded head hash {head_hash[:12]}... differs from the last entry's "
            f"{result.head_hash[:12]}...: the head or the last entry was rewritten"
        )
    return VerificationResult(False, count, result.head_hash, first_bad, reason)


def verify_chain(*, chunk_size: int = 5000) -> VerificationResult:
    """Recompute the whole chain and compare its end with the recorded head.

    The walk of record: the application recomputes every hash (the fast walk of
    :mod:`audit.ledger.fast_walk`, and the definition wherever it doubts), trusting nothing
    the database computes. The rows and the head come from one snapshot
    (:func:`_one_snapshot`).
    """
    with _one_snapshot():
        return _verify_snapshot(chunk_size)


def verify_chain_in_database(*, chunk_size: int = 5000) -> VerificationResult:
    """PostgreSQL recomputes the chain itself and sends back only what is wrong
    (:func:`audit.ledger.fast_walk.chain_mismatches_in_database`): a quick check of a large
    ledger with nothing crossing the network. It trusts the database server's functions, so
    it is not the verification of record (:func:`verify_chain` is). Whatever it finds is
    walked again by the definition, in the same snapshot, for the exact entry and reason, so
    its answers are :func:`verify_chain`'s."""
    connection = transaction.get_connection(LedgerEntry.objects.db)
    if connection.vendor != "postgresql":
        raise ValueError(
            f"verifying inside the database needs PostgreSQL; this database is {connection.vendor}"
        )
    with _one_snapshot():
        check = fast_walk.chain_mismatches_in_database(
            connection, LedgerEntry._meta.db_table, _CHAIN_DB_COLUMNS, genesis=GENESIS_HASH
        )
        if not check.intact:
            return _walk_by_definition(chunk_size)
        found = VerificationResult(True, check.entry_count, check.last_hash or GENESIS_HASH)
        return _check_head(found, *_read_head())


@contextlib.contextmanager
def _one_snapshot() -> Iterator[None]:
    """Read the rows and the head from one snapshot, so that entries appended while the walk
    runs cannot look like a broken tail: on PostgreSQL a read-only REPEATABLE READ transaction
    (which also spares the server-side cursor the copy a WITH HOLD cursor makes in
    autocommit); on SQLite (WAL) a deferred read transaction, whose snapshot holds from its
    first read to its end. (Reading the head while the rows' statement is open is not enough
    there: a chain that fits in the first fetch ends the statement, and with it the snapshot,
    before the head is read.) Inside a caller's transaction the caller's snapshot is used as
    it is."""
    connection = transaction.get_connection(LedgerEntry.objects.db)
    if connection.in_atomic_block:
        yield
    elif connection.vendor == "postgresql":
        with transaction.atomic(using=LedgerEntry.objects.db):
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            yield
    elif connection.vendor == "sqlite":
        # Not transaction.atomic(): the settings make its BEGIN IMMEDIATE, which takes the
        # write lock and would stall every writer for the whole walk.
        with connection.cursor() as cursor:
            cursor.execute("BEGIN DEFERRED")
        try:
            yield
        finally:
            with connection.cursor() as cursor:
                cursor.execute("COMMIT")  # read only: nothing to keep or undo
    else:
        yield


def _read_head() -> tuple[int, str]:
    head = LedgerHead.objects.filter(pk=1).values_list("seq", "entry_hash").first()
    return head if head is not None else (0, GENESIS_HASH)


def _verify_snapshot(chunk_size: int) -> VerificationResult:
    fast = _fast_walk(chunk_size)
    if fast is not None and fast.head is not None:
        return _check_head(VerificationResult(True, fast.entry_count, fast.last_hash), *fast.head)
    # Empty, broken, or a row the fast walk could not vouch for: the definition decides, in the
    # same snapshot, and names what is wrong.
    return _walk_by_definition(chunk_size)


def _fast_walk(chunk_size: int) -> fast_walk.FastWalk | None:
    """The fast walk's "intact" (``fast_walk.walk``), or None where the definition must walk."""
    connection = transaction.get_connection(LedgerEntry.objects.db)
    sql = fast_walk.walk_sql(connection, LedgerEntry._meta.db_table, _CHAIN_DB_COLUMNS)
    if sql is None:
        return None
    # _read_head looked up at call time: a test replaces it to append during the walk.
    return fast_walk.walk(
        connection, sql, genesis=GENESIS_HASH, chunk_size=chunk_size, read_head=_read_head
    )


def _walk_by_definition(chunk_size: int) -> VerificationResult:
    head: list[tuple[int, str]] = []

    def rows_reading_head() -> Iterator[ChainRow]:
        rows = _rows(chunk_size)
        for row in rows:
            if not head:
                # The rows' statement is open: same read transaction, same snapshot.
                head.append(_read_head())
            yield row

    result = verify_rows(rows_reading_head())
    if not head:  # no rows at all (or the walk stopped before reading any)
        head.append(_read_head())
        if result.ok and head[0][0] and LedgerEntry.objects.exists():
            # The first entries were appended between the two reads: walk again.
            return _walk_by_definition(chunk_size)
    if not result.ok:
        return result
    return _check_head(result, *head[0])
