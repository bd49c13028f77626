"""Writes of the audit app: recording a contribution report's export in the ledger.

Why the file is built before anything is sent (to a spooled temporary file: in memory up to
:data:`SPOOL_MEMORY_BYTES`, on disk beyond): the export's ledger entry names the file's SHA-256,
and it is committed before the first byte leaves. Computing the digest while streaming to the
client would mean recording the entry after the last byte, outside the request, where a client
that disconnects half-way gets part of a file no entry describes, and a failed append cannot be
reported to anyone. Spooling keeps memory flat all the same (the CSV is written row by row into the
spool, which moves to disk past its threshold) and lets the response carry the digest and the
entry's seq in its headers. The cost is the time to first byte: the whole report is built first.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, BinaryIO

from django.db import transaction

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry
from audit.models import LedgerEntry
from audit.reports.build import build_report
from audit.reports.contents import SCHEMA_VERSION
from audit.reports.errors import ReportError
from audit.reports.files import FORMATS, write_report
from audit.reports.scope import Head, Scope

SPOOL_MEMORY_BYTES = 1 << 20
CONTENT_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "pdf": "application/pdf",
}


@dataclass(frozen=True)
class ExportResult:
    """What was exported: the file's digest and size, the head it was made from, the entry."""

    scope: Scope
    fmt: str
    sha256: str
    size_bytes: int
    head: Head
    filename: str
    entry: LedgerEntry


def spool() -> BinaryIO:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, mode="w+b")


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ReportError(f"unknown report format {fmt!r} (use {', '.join(FORMATS)})")


@dataclass(frozen=True)
class ExportKind:
    """How one kind of report is written to a file, and the schema version its files follow."""

    write: Callable[[Any, str, BinaryIO], tuple[str, int]]
    schema_version: int


def write_and_record(
    event: str,
    kind: ExportKind,
    report,
    fmt: str,
    out: BinaryIO,
    acting_user,
    actor_repr: str | None,
    subject,
    institution_slug: str = "",
) -> ExportResult:
    """Write ``report`` (any kind: it has a ``scope`` and a ``head``) as ``fmt`` to ``out``,
    then append its export entry ``event`` naming the file's SHA-256, size and head. Every kind
    of report records its exports with the same payload, so ``verify_report`` finds them
    alike."""
    check_format(fmt)
    digest, size = kind.write(report, fmt, out)
    scope = report.scope
    filename = scope.filename(report.head, fmt)
    with transaction.atomic():
        entry = append_entry(
            event=event,
            actor=acting_user,
            actor_repr=actor_repr,
            subject=subject,
            consortium_slug=scope.consortium,
            institution_slug=institution_slug,
            payload={
                "scope": scope.to_json(),
                "format": fmt,
                "schema_version": kind.schema_version,
                "filename": filename,
                "sha256": digest,
                "size_bytes": size,
                "ledger_head": report.head.to_json(),
            },
        )
    return ExportResult(scope, fmt, digest, size, report.head, filename, entry)


CONTRIBUTION_EXPORT = ExportKind(write_report, SCHEMA_VERSION)


def report_export(
    *,
    acting_user,
    scope: Scope,
    fmt: str,
    out: BinaryIO,
    head: Head | None = None,
    subject=None,
    actor_repr: str | None = None,
) -> ExportResult:
    """Write the report for ``scope`` (up to ``head``, default the current head) as ``fmt``
    to ``out``, then record the export in the ledger: who, what, the format, the file's
    SHA-256 and size, and the head it was made from.

    ``subject`` is the job or institution the report is about (so the export shows in its
    history). The entry is appended after the head the report names, so it is never part of it.
    """
    check_format(fmt)
    return write_and_record(
        ledger_events.REPORT_EXPORTED,
        CONTRIBUTION_EXPORT,
        build_report(scope, head),
        fmt,
        out,
        acting_user,
        actor_repr,
        subject,
        scope.institution or "",
    )
