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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, BinaryIO

from audit.reports.build import ContributionReport
from audit.reports.contents import records_from_document
from audit.reports.embedded import pdf_document
from audit.reports.errors import MalformedReport
from audit.reports.formats import LAYOUT, iter_csv, json_bytes
from audit.reports.institutions import institution_directory
from audit.reports.mechanisms import report_mechanisms
from audit.reports.pdf import render_pdf
from audit.reports.scope import Head, Scope
from audit.reports.tabular import RecordLayout

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
        writer.write(render_contribution_pdf(report.document()))
    else:
        raise ValueError(f"unknown report format {fmt!r}")
    return writer.sha256.hexdigest(), writer.size


def render_contribution_pdf(doc: dict) -> bytes:
    """A contribution report's PDF, its institutions named as the ledger named them at the
    report's head and each job's privacy mechanisms read from the ledger up to it (so rendering
    it again later, after a rename or more rounds, gives the same bytes)."""
    consortium, head = doc["scope"]["consortium"], doc["ledger_head"]["seq"]
    names = institution_directory(consortium, head)
    jobs = {r["job_id"] for r in doc["summary"] if r["job_id"] is not None}
    mechanisms = report_mechanisms(consortium, up_to=head, job_ids=jobs)
    return render_pdf(doc, names, mechanisms)


def report_bytes(report: ContributionReport, fmt: str) -> bytes:
    buffer = io.BytesIO()
    write_report(report, fmt, buffer)
    return buffer.getvalue()


@dataclass(frozen=True)
class ReportFormats:
    """One kind of report's writers and readers, for the code that picks among CSV, JSON and
    PDF: given them, :meth:`document_bytes` and :meth:`read_document` behave alike for every
    kind of report (the contribution report, :data:`CONTRIBUTION`; the compliance report,
    :mod:`audit.reports.compliance_files`)."""

    iter_csv: Callable[[Any, Head, Iterable[dict]], Iterable[str]]
    records_from_document: Callable[[dict], Iterable[dict]]
    render_pdf: Callable[[dict], bytes]
    csv_document: Callable[[str], dict]
    json_document: Callable[[Any], dict]
    pdf_document: Callable[[bytes], dict]
    scope_from_json: Callable[[Any], Any]

    @classmethod
    def of(
        cls,
        layout: RecordLayout,
        records_from_document: Callable[[dict], Iterable[dict]],
        render_pdf: Callable[[dict], bytes],
        pdf_document: Callable[[bytes], dict],
    ) -> ReportFormats:
        """The formats of a report whose CSV and JSON follow ``layout``."""
        return cls(
            layout.iter_csv,
            records_from_document,
            render_pdf,
            layout.csv_document,
            layout.json_document,
            pdf_document,
            layout.scope_from_json,
        )

    def document_bytes(self, fmt: str, scope: Any, head: Head, doc: dict) -> bytes:
        """The file ``fmt`` for a report's document: what ``verify_report`` compares a file
        with."""
        if fmt == "csv":
            return "".join(self.iter_csv(scope, head, self.records_from_document(doc))).encode(
                "utf-8"
            )
        if fmt == "json":
            return json_bytes(doc)
        if fmt == "pdf":
            return self.render_pdf(doc)
        raise ValueError(f"unknown report format {fmt!r}")

    def read_document(self, data: bytes) -> tuple[str, dict]:
        """Recognise a report file by its content; return (format, document)."""
        if not data:
            raise MalformedReport("the file is empty")
        if data.startswith(b"%PDF-"):
            return "pdf", self.pdf_document(data)
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise MalformedReport("the file is neither a PDF nor UTF-8 text") from None
        if text.lstrip().startswith("{"):
            try:
                parsed = json.loads(text)
            except ValueError as exc:
                raise MalformedReport(f"the JSON is unreadable ({exc})") from None
            return "json", self.json_document(parsed)
        return "csv", self.csv_document(text)


CONTRIBUTION = ReportFormats.of(
    LAYOUT, records_from_document, render_contribution_pdf, pdf_document
)


def document_bytes(fmt: str, scope: Scope, head: Head, doc: dict) -> bytes:
    """The file ``fmt`` for a report's document (the bytes :func:`write_report` gives for the
    report the document was gathered from): what ``verify_report`` compares a file with."""
    return CONTRIBUTION.document_bytes(fmt, scope, head, doc)


def read_document(data: bytes) -> tuple[str, dict]:
    """Recognise a report file by its content; return (format, document)."""
    return CONTRIBUTION.read_document(data)
