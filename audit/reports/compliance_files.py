"""A compliance report's files: CSV, JSON and PDF (rendered by :mod:`audit.reports.compliance_pdf`),
written (with their SHA-256) and read back.

The same conventions as the contribution reports, through the same code
(:mod:`audit.reports.tabular`, :class:`audit.reports.files.ReportFormats`): the CSV has fixed
columns (every row repeats the schema version, the scope and the ledger head; text that a
spreadsheet could take for a formula is escaped by :func:`audit.reports.formats.escape_cell`);
the JSON is the document indented with sorted keys (:func:`audit.reports.formats.json_bytes`);
the PDF (reportlab, reproducible bytes) embeds the document in ``/Keywords`` under its own
marker (:mod:`audit.reports.embedded`), so ``verify_report`` reads its figures back exactly and
compares its pages by rendering them again. Hospitals are named by name; ε and δ are written
as such (the Symbol font, which the PDF standard fonts include).
"""

from __future__ import annotations

import io
import json
from typing import BinaryIO

from audit.reports import compliance_contents
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import (
    RECORD_FIELDS,
    SCHEMA,
    ComplianceScope,
    records_from_document,
)
from audit.reports.compliance_pdf import PDF_MARKER, render_pdf
from audit.reports.embedded import embedded_document
from audit.reports.files import FORMATS, DigestingWriter, ReportFormats
from audit.reports.tabular import HEADER_COLUMNS, RecordLayout, head_of

FIELD_COLUMNS: tuple[str, ...] = tuple(
    dict.fromkeys(
        name for fields in RECORD_FIELDS.values() for name in fields if name != "consortium"
    )
)
COLUMNS = HEADER_COLUMNS + FIELD_COLUMNS

LAYOUT = RecordLayout.of(
    compliance_contents,
    what="compliance report",
    field_columns=FIELD_COLUMNS,
    scope_class=ComplianceScope,
    unescape_header=True,
)


def pdf_document(data: bytes) -> dict:
    return embedded_document(
        data, PDF_MARKER, LAYOUT.json_document, "the PDF carries no embedded compliance report"
    )


COMPLIANCE = ReportFormats.of(LAYOUT, records_from_document, render_pdf, pdf_document)
document_bytes = COMPLIANCE.document_bytes
read_compliance_document = COMPLIANCE.read_document

__all__ = [
    "FORMATS",
    "compliance_bytes",
    "document_bytes",
    "head_of",
    "is_compliance_file",
    "read_compliance_document",
]


def write_compliance(report: ComplianceReport, fmt: str, out: BinaryIO) -> tuple[str, int]:
    """Write ``report`` as ``fmt`` to ``out``; return (sha256 hex, size)."""
    writer = DigestingWriter(out)
    writer.write(document_bytes(fmt, report.scope, report.head, report.document()))
    return writer.sha256.hexdigest(), writer.size


def compliance_bytes(report: ComplianceReport, fmt: str) -> bytes:
    buffer = io.BytesIO()
    write_compliance(report, fmt, buffer)
    return buffer.getvalue()


def is_compliance_file(data: bytes) -> bool:
    """Whether ``data`` claims to be a compliance report (by its content, as a contribution
    report is recognised): the PDF marker, the JSON schema, or the CSV header."""
    if data.startswith(b"%PDF-"):
        return PDF_MARKER in data
    head = data[:4096].decode("utf-8-sig", errors="replace").lstrip()
    if head.startswith("{"):
        try:
            parsed = json.loads(data.decode("utf-8-sig"))
        except ValueError:
            return False
        return isinstance(parsed, dict) and parsed.get("schema") == SCHEMA
    return head.startswith(",".join(COLUMNS))
