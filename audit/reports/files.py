"""A contribution report's files: the one place that picks CSV, JSON or PDF, to write a report
(with its SHA-256 computed on the way) or to recognise one by its content and read it back.

It sits above the formats (:mod:`audit.reports.formats` for CSV and JSON, :mod:`audit.reports.pdf`
to render a PDF, :mod:`audit.reports.embedded` to read a PDF's embedded document), none of which
imports another's writer.
"""

from __future__ import annotations

import hashlib
import io
import json
from typing import BinaryIO

from audit.reports.build import ContributionReport
from audit.reports.contents import records_from_document
from audit.reports.embedded import pdf_document
from audit.reports.errors import MalformedReport
from audit.reports.formats import csv_document, iter_csv, json_bytes, json_document
from audit.reports.pdf import render_pdf
from audit.reports.scope import Head, Scope

FORMATS = ("csv", "json", "pdf")


class DigestingWriter:
    """Writes bytes to ``out`` while hashing and counting them."""

    def __init__(self, out: BinaryIO):
        self.out = out
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> None:
        self.sha256.update(data)
        self.size += len(data)
        self.out.write(data)


def write_report(report: ContributionReport, fmt: str, out: BinaryIO) -> tuple[str, int]:
    """Write ``report`` as ``fmt`` to the binary file ``out``; return (sha256 hex, size).

    CSV is written as the records come (memory stays flat whatever the ledger's length); JSON
    and PDF are documents built whole, their size bounded by the report's, not the ledger's.
    """
    writer = DigestingWriter(out)
    if fmt == "csv":
        for chunk in iter_csv(report.scope, report.head, report.records()):
            writer.write(chunk.encode("utf-8"))
    elif fmt == "json":
        writer.write(json_bytes(report.document()))
    elif fmt == "pdf":
        writer.write(render_pdf(report.document()))
    else:
        raise ValueError(f"unknown report format {fmt!r}")
    return writer.sha256.hexdigest(), writer.size


def report_bytes(report: ContributionReport, fmt: str) -> bytes:
    buffer = io.BytesIO()
    write_report(report, fmt, buffer)
    return buffer.getvalue()


def document_bytes(fmt: str, scope: Scope, head: Head, doc: dict) -> bytes:
    """The file ``fmt`` for a report's document (the bytes :func:`write_report` gives for the
    report the document was gathered from): what ``verify_report`` compares a file with."""
    if fmt == "csv":
        return "".join(iter_csv(scope, head, records_from_document(doc))).encode("utf-8")
    if fmt == "json":
        return json_bytes(doc)
    if fmt == "pdf":
        return render_pdf(doc)
    raise ValueError(f"unknown report format {fmt!r}")


def read_document(data: bytes) -> tuple[str, dict]:
    """Recognise a report file by its content; return (format, document)."""
    if not data:
        raise MalformedReport("the file is empty")
    if data.startswith(b"%PDF-"):
        return "pdf", pdf_document(data)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise MalformedReport("the file is neither a PDF nor UTF-8 text") from None
    if text.lstrip().startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise MalformedReport(f"the JSON is unreadable ({exc})") from None
        return "json", json_document(parsed)
    return "csv", csv_document(text)
