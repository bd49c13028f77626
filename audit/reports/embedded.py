"""The report's document embedded in its PDF: the metadata that :mod:`audit.reports.pdf` writes
and :mod:`audit.reports.files` reads back.

The PDF's ``/Keywords`` carry ``flc-contribution-report:<base64 of the document's canonical
JSON>``: base64 needs no escaping in a PDF string, so the document is read back with a byte
search, without a PDF library (:func:`pdf_document`), and any PDF reader shows it in the
document's properties. Writing and reading live here together so that the renderer and the
reader agree on one marker, and neither has to import the other.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Callable
from typing import Any

from audit.ledger.canonical import canonical_json
from audit.reports.errors import MalformedReport
from audit.reports.formats import json_document

PDF_MARKER = b"flc-contribution-report:"


def pdf_keywords(doc: dict, marker: bytes = PDF_MARKER) -> str:
    """The ``/Keywords`` text that carries the document inside the PDF (``marker`` names the
    kind of report: the compliance report has its own, :mod:`audit.reports.compliance_files`)."""
    return marker.decode() + base64.b64encode(canonical_json(doc).encode()).decode()


def embedded_payloads(data: bytes, marker: bytes) -> list[bytes]:
    """The base64 payloads that follow ``marker`` in a PDF's bytes (one for a report's PDF)."""
    return re.findall(re.escape(marker) + rb"([A-Za-z0-9+/=]+)", data)


def embedded_document(
    data: bytes, marker: bytes, json_document: Callable[[Any], dict], missing: str
) -> dict:
    """The document embedded after ``marker`` in a report PDF, checked by ``json_document``;
    ``missing`` says what is wrong when the PDF carries none. Shared by every kind of report,
    so they reject a PDF in the same words."""
    found = embedded_payloads(data, marker)
    if not found:
        raise MalformedReport(missing)
    if len(set(found)) > 1:
        raise MalformedReport("the PDF carries more than one embedded report")
    try:
        text = base64.b64decode(found[0], validate=True).decode("utf-8")
        return json_document(json.loads(text))
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedReport(f"the PDF's embedded report is unreadable ({exc})") from None


def pdf_document(data: bytes) -> dict:
    """The document embedded in a contribution report PDF."""
    return embedded_document(
        data,
        PDF_MARKER,
        json_document,
        "the PDF carries no embedded contribution report (no flc-contribution-report "
        "keywords): it was not made by export_contributions, or was re-saved by a tool "
        "that dropped its metadata",
    )
