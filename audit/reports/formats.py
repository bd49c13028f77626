"""A contribution report's CSV and JSON: written and read back.

CSV (schema version :data:`~audit.reports.contents.SCHEMA_VERSION`): fixed columns
(:data:`COLUMNS`), one row per record. Every row repeats the schema version, the scope and the
ledger head the report was made from, so a row copied out of the file still says where it came
from. Numbers are written as Python writes them (``repr`` for floats: read back bit for bit); empty
cells are "no value". Text cells that a spreadsheet could take for a formula (starting with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return) get a leading apostrophe, and so does text that
already starts with one, so that reading back (drop one leading apostrophe) is exact. Numbers we
write ourselves are never escaped: ``-0.25`` is a number to a spreadsheet, not a formula.

JSON: the report's document (:func:`audit.reports.contents.document_from_records`), indented,
keys sorted; :func:`json_document` checks a document's shape (the PDF's embedded document too,
see :mod:`audit.reports.embedded`).

The writing and reading themselves are :mod:`audit.reports.tabular`'s, shared with the compliance
report; this module names the contribution report's columns and fields.
Choosing among CSV, JSON and PDF, and writing with a digest, is :mod:`audit.reports.files`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from audit.reports import contents
from audit.reports.contents import RECORD_FIELDS
from audit.reports.scope import Head, Scope
from audit.reports.tabular import (
    CSV_ROWS_PER_CHUNK,
    HEADER_COLUMNS,
    RecordLayout,
    escape_cell,
    head_of,
    json_bytes,
    unescape_cell,
)

FIELD_COLUMNS = (
    "job_id",
    "round",
    "institution",
    "status",
    "score",
    "score_rounds_sum",
    "score_method",
    "score_metric",
    "samples",
    "rounds_participated",
    "updates_accepted",
    "updates_rejected",
    "epsilon_spent",
    "epsilon_total",
    "epsilon_cap",
    "delta",
    "within_cap",
    "update_digest",
    "model_digest",
    "lineage_hash",
    "ledger_seq",
    "at",
    "title",
    "detail",
)
COLUMNS = HEADER_COLUMNS + FIELD_COLUMNS
# Every record field has its column; "consortium" is a header column.
assert all(
    name in FIELD_COLUMNS or name == "consortium"
    for fields in RECORD_FIELDS.values()
    for name in fields
)

LAYOUT = RecordLayout.of(
    contents, what="contribution report", field_columns=FIELD_COLUMNS, scope_class=Scope
)

__all__ = [
    "COLUMNS",
    "CSV_ROWS_PER_CHUNK",
    "FIELD_COLUMNS",
    "HEADER_COLUMNS",
    "LAYOUT",
    "csv_document",
    "csv_row",
    "escape_cell",
    "head_of",
    "iter_csv",
    "json_bytes",
    "json_document",
    "row_writer",
    "unescape_cell",
]


def row_writer(scope: Scope, head: Head) -> Callable[[dict], list[str]]:
    """A function turning a record into the CSV's cells, in :data:`COLUMNS` order."""
    return LAYOUT.row_writer(scope, head)


def csv_row(scope: Scope, head: Head, record: dict) -> list[str]:
    """One record as the CSV's cells, in :data:`COLUMNS` order."""
    return LAYOUT.row_writer(scope, head)(record)


def iter_csv(scope: Scope, head: Head, records: Iterable[dict]) -> Iterator[str]:
    """The CSV text in chunks of rows, as the records come (nothing is held back)."""
    return LAYOUT.iter_csv(scope, head, records)


def csv_document(text: str) -> dict:
    """Read a report CSV back into the report's document (what :func:`json_document` gives)."""
    return LAYOUT.csv_document(text)


def json_document(data: Any) -> dict:
    """Check the shape of a report's document (parsed JSON) and return it."""
    return LAYOUT.json_document(data)
