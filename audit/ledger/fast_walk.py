"""Verification's fast walk over the chain, and a check inside PostgreSQL.

The definition of an entry's hash is :func:`audit.ledger.chain.entry_canonical_text` of the
values Django reads back. Walking the chain that way spends most of its time in Django turning
rows into Python values (on PostgreSQL the driver parses every timestamp; on SQLite Django's
converters do) rather than in the hash. This walk reads the same columns through a plain
cursor, in large batches, with the timestamp already written as the canonical text by the
database, and builds the canonical text inline; the next batch is fetched on a second thread
while this one is hashed (the driver waits on the database without the GIL).

It is an accelerator, not a second definition. It only ever answers "intact" (the count and
the last hash) or "look again": any row it cannot vouch for (a link or a hash that does not
match, a value of an odd type, a timestamp the database writes differently from Python) makes
it answer ``None``, and the caller walks the chain again by the definition, in the same
snapshot, for the authoritative result and its message. It cannot pass an entry the definition
would refuse: its text differs from the definition's only in how the timestamp is written, and
the database's writing of a stored timestamp is one-to-one onto the canonical form for every
timestamp Python can hold (SQLite: a stored text that is not Django's own form is passed to the
definition as it is, so it cannot match; PostgreSQL: ``to_char`` pads the year to four digits,
as the definition does from year 1000, and the definition never wrote a four-digit year below
that), so a match of its hash is a match of the definition's (barring a SHA-256 collision).

:func:`chain_mismatches_in_database` is the other way the issue of verification speed asked
for: PostgreSQL recomputes every hash itself (``sha256()`` over the same text, built by
``to_json``, whose escaping is Python's with ``ensure_ascii=False``) in a parallel scan, and
returns only what is wrong, so nothing crosses the network. It trusts the database server's
functions, which is exactly whom a ledger is kept against; the application's walk stays the
verification of record (``verify_ledger``, the Verify button) and the database's is offered as
a quick check (``verify_ledger --in-database``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from django.db.backends.base.base import BaseDatabaseWrapper

# json.dumps(..., ensure_ascii=False) encodes every str with this function.
_enc = json.encoder.encode_basestring

# The stored timestamp as the definition writes it (``chain.format_timestamp``). SQLite holds
# Django's own text, 'YYYY-MM-DD HH:MM:SS[.ffffff]' in UTC (no fraction when it is zero);
# anything else is passed on unchanged, so that it cannot match and the definition decides.
_SQLITE_TIMESTAMP = (
    "CASE WHEN length({c}) = 26 AND substr({c}, 11, 1) = ' ' "
    "THEN substr({c}, 1, 10) || 'T' || substr({c}, 12) || 'Z' "
    "WHEN length({c}) = 19 AND substr({c}, 11, 1) = ' ' "
    "THEN substr({c}, 1, 10) || 'T' || substr({c}, 12) || '.000000Z' "
    "ELSE {c} END"
)
_POSTGRESQL_TIMESTAMP = """to_char({c} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


@dataclass(frozen=True)
class FastWalk:
    """An intact walk's end: how many entries, the last one's hash, and the head read in the
    walk's snapshot (``None`` if the ledger had no entry when it was read)."""

    entry_count: int
    last_hash: str
    head: tuple[int, str] | None


def timestamp_sql(vendor: str, column: str) -> str | None:
    """The SQL that writes a stored timestamp as the canonical text, or None for a database
    this walk does not know (the caller then walks by the definition)."""
    if vendor == "postgresql":
        return _POSTGRESQL_TIMESTAMP.format(c=column)
    if vendor == "sqlite":
        return _SQLITE_TIMESTAMP.format(c=column)
    return None


def walk_sql(connection: BaseDatabaseWrapper, table: str, columns: tuple[str, ...]) -> str | None:
    """SELECT the chain's columns (``chain.CHAIN_COLUMNS`` order, the last one the timestamp)
    by sequence number, the timestamp as its canonical text."""
    quote = connection.ops.quote_name
    stamp = timestamp_sql(connection.vendor, quote(columns[-1]))
    if stamp is None:
        return None
    selected = ", ".join([*(quote(c) for c in columns[:-1]), stamp])
    # Only quoted table and column names are interpolated; there are no values.
    return f"SELECT {selected} FROM {quote(table)} ORDER BY {quote(columns[0])}"  # noqa: S608


def walk(
    connection: BaseDatabaseWrapper,
    sql: str,
    *,
    genesis: str,
    chunk_size: int,
    read_head: Callable[[], tuple[int, str]],
) -> FastWalk | None:
    """Walk the rows ``sql`` selects; ``None`` as soon as one is not plainly right.

    ``read_head`` is called once the first batch is in (the read transaction's snapshot is
    then taken), before any other fetch, so the head comes from the rows' snapshot.
    """
    cursor = connection.chunked_cursor()
    try:
        cursor.execute(sql)
        batch = cursor.fetchmany(chunk_size)
        head = read_head() if batch else None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-fetch") as fetcher:
            expected_prev, count = genesis, 0
            while batch:
                following = fetcher.submit(cursor.fetchmany, chunk_size)
                try:
                    walked = _walk_batch(batch, expected_prev, count)
                finally:
                    batch = following.result()  # the connection is ours again after this
                if walked is None:
                    return None
                expected_prev, count = walked
        return FastWalk(count, expected_prev, head)
    finally:
        cursor.close()


def _walk_batch(
    rows: list[tuple[Any, ...]], expected_prev: str, count: int
) -> tuple[str, int] | None:
    """Check one batch; the last hash and the count so far, or None at the first doubt."""
    sha256 = hashlib.sha256
    enc = _enc
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
        count += 1
        if seq != count or prev_hash != expected_prev or type(seq) is not int:
            return None
        if actor_id is None:
            actor = "null"
        elif type(actor_id) is int:
            actor = str(actor_id)
        else:
            return None
        try:
            # The sorted-key object of chain.entry_canonical_text, written inline.
            text = (
                f'{prev_hash}{{"actor":{enc(actor_repr)},"actor_id":{actor},'
                f'"consortium":{enc(consortium_slug)},"created_at":"{created_at}",'
                f'"event":{enc(event)},"institution":{enc(institution_slug)},'
                f'"payload":{enc(payload_text)},"seq":{seq},"subject_id":{enc(subject_id)},'
                f'"subject_type":{enc(subject_type)}}}'
            )
        except TypeError:  # not text (a blob planted in SQLite): the definition decides
            return None
        if type(created_at) is not str or sha256(text.encode()).hexdigest() != entry_hash:
            return None
        expected_prev = entry_hash
    return expected_prev, count


# --- Inside PostgreSQL ---------------------------------------------------------------------


def _canonical_text_sql(quote: Callable[[str], str], columns: tuple[str, ...]) -> str:
    """PostgreSQL's writing of ``prev_hash || canonical text``: the same bytes as the
    definition's for every value the definition writes with a four-digit year."""
    (seq, prev_hash, _entry_hash, event, actor_id, actor, subject_type, subject_id, consortium,
     institution, payload, created_at) = (quote(c) for c in columns)  # fmt: skip

    def text(column: str) -> str:
        return f"to_json({column})::text"

    parts = [
        prev_hash,
        "'{\"actor\":'",
        text(actor),
        "',\"actor_id\":'",
        f"coalesce({actor_id}::text, 'null')",
        "',\"consortium\":'",
        text(consortium),
        '\',"created_at":"\'',
        _POSTGRESQL_TIMESTAMP.format(c=created_at),
        '\'","event":\'',
        text(event),
        "',\"institution\":'",
        text(institution),
        "',\"payload\":'",
        text(payload),
        "',\"seq\":'",
        f"{seq}::text",
        "',\"subject_id\":'",
        text(subject_id),
        "',\"subject_type\":'",
        text(subject_type),
        "'}'",
    ]
    return " || ".join(parts)


@dataclass(frozen=True)
class DatabaseCheck:
    """What PostgreSQL found: the number of entries, the highest sequence number, the hash
    of the entry numbered ``entry_count``, the first entry whose hash is not its content's,
    and the first whose ``prev_hash`` is not its predecessor's hash (``None``: none)."""

    entry_count: int
    max_seq: int
    last_hash: str | None
    first_altered: int | None
    first_unlinked: int | None

    @property
    def intact(self) -> bool:
        return (
            self.entry_count == self.max_seq
            and self.first_altered is None
            and self.first_unlinked is None
        )


def chain_mismatches_in_database(
    connection: BaseDatabaseWrapper, table: str, columns: tuple[str, ...], *, genesis: str
) -> DatabaseCheck:
    """Let PostgreSQL recompute every entry's hash and every link (see the module docstring).

    Set-wise, not as a walk: each hash depends only on the row's own stored columns, and each
    link only on its predecessor's, so the scans may run in parallel; numbering 1..n without a
    gap is ``count = max(seq)`` (sequence numbers are unique and positive).
    """
    quote = connection.ops.quote_name
    seq, prev_hash, entry_hash = (quote(c) for c in columns[:3])
    tbl = quote(table)
    recomputed = f"encode(sha256(convert_to({_canonical_text_sql(quote, columns)}, 'UTF8')), 'hex')"
    # Only quoted names and the fixed SQL above are interpolated; the genesis is a parameter.
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*), coalesce(max({seq}), 0) FROM {tbl}")  # noqa: S608
        count, max_seq = cursor.fetchone()
        cursor.execute(f"SELECT {entry_hash} FROM {tbl} WHERE {seq} = %s", [count])  # noqa: S608
        last = cursor.fetchone()
        cursor.execute(f"SELECT min({seq}) FROM {tbl} WHERE {recomputed} <> {entry_hash}")  # noqa: S608
        (first_altered,) = cursor.fetchone()
        cursor.execute(
            f"SELECT min(e.{seq}) FROM {tbl} e LEFT JOIN {tbl} p ON p.{seq} = e.{seq} - 1 "  # noqa: S608
            f"WHERE e.{prev_hash} IS DISTINCT FROM "
            f"CASE WHEN e.{seq} = 1 THEN %s ELSE p.{entry_hash} END",
            [genesis],
        )
        (first_unlinked,) = cursor.fetchone()
    return DatabaseCheck(count, max_seq, last[0] if last else None, first_altered, first_unlinked)
