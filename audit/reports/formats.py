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

Choosing among CSV, JSON and PDF, and writing with a digest, is :mod:`audit.reports.files`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from audit.reports.contents import (
    BOOL_FIELDS,
    FLOAT_FIELDS,
    GROUPS,
    INT_FIELDS,
    RECORD_FIELDS,
    SCHEMA,
    SCHEMA_VERSION,
    document_from_records,
)
from audit.reports.errors import MalformedReport
from audit.reports.scope import Head, Scope

HEADER_COLUMNS = (
    "schema_version",
    "record",
    "scope",
    "consortium",
    "ledger_head_seq",
    "ledger_head_hash",
    "ledger_entry_count",
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

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
CSV_ROWS_PER_CHUNK = 256


# --- CSV ------------------------------------------------------------------------------------------


def escape_cell(text: str) -> str:
    """A text cell as written: a leading apostrophe where a spreadsheet could see a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def unescape_cell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def _cell(name: str, value: Any) -> str:
    kind = type(value)
    if value is None:
        return ""
    if kind is str:
        return escape_cell(value)
    if kind is bool or name in BOOL_FIELDS:
        return "yes" if value else "no"
    if kind is int:
        return str(value)
    if kind is float:
        return repr(value)
    return escape_cell(str(value))


_FIELD_INDEX = {name: i for i, name in enumerate(FIELD_COLUMNS)}
_PLANS = {
    kind: tuple((_FIELD_INDEX[name], name) for name in fields if name != "consortium")
    for kind, fields in RECORD_FIELDS.items()
}


def row_writer(scope: Scope, head: Head) -> Callable[[dict], list[str]]:
    """A function turning a record into the CSV's cells (:data:`COLUMNS` order). The columns
    every row repeats are formatted once; each record fills only its own columns."""
    prefix = [
        _cell("schema_version", SCHEMA_VERSION),
        "",
        _cell("scope", scope.label),
        _cell("consortium", scope.consortium),
        _cell("ledger_head_seq", head.seq),
        _cell("ledger_head_hash", head.entry_hash),
        _cell("ledger_entry_count", head.entry_count),
    ]
    blank = [""] * len(FIELD_COLUMNS)

    def cells(record: dict) -> list[str]:
        kind = record["record"]
        row = prefix.copy()
        row[1] = kind
        fields = blank.copy()
        get = record.get
        for index, name in _PLANS[kind]:
            value = get(name)
            if value is not None:
                fields[index] = _cell(name, value)
        row += fields
        return row

    return cells


def csv_row(scope: Scope, head: Head, record: dict) -> list[str]:
    """One record as the CSV's cells, in :data:`COLUMNS` order."""
    return row_writer(scope, head)(record)


def iter_csv(scope: Scope, head: Head, records: Iterable[dict]) -> Iterator[str]:
    """The CSV text in chunks of rows, as the records come (nothing is held back)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(COLUMNS)
    cells = row_writer(scope, head)
    pending = 1
    for record in records:
        writer.writerow(cells(record))
        pending += 1
        if pending >= CSV_ROWS_PER_CHUNK:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
            pending = 0
    if pending:
        yield buffer.getvalue()


def _typed(name: str, cell: str, line: int) -> Any:
    if cell == "":
        return None
    try:
        if name in INT_FIELDS:
            if not re.fullmatch(r"-?\d+", cell):
                raise ValueError
            return int(cell)
        if name in FLOAT_FIELDS:
            return float(cell)
    except ValueError:
        raise MalformedReport(f"line {line}: column {name} holds {cell!r}, not a number") from None
    if name in BOOL_FIELDS:
        if cell not in ("yes", "no"):
            raise MalformedReport(f"line {line}: column {name} holds {cell!r}, not yes or no")
        return cell == "yes"
    return unescape_cell(cell)


def csv_document(text: str) -> dict:
    """Read a report CSV back into the report's document (what :func:`json_document` gives)."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise MalformedReport("the file is empty") from None
    except csv.Error as exc:
        raise MalformedReport(f"line 1: {exc}") from None
    if tuple(header) != COLUMNS:
        raise MalformedReport(
            "the first line is not the header of a contribution report CSV (expected the "
            f"columns {', '.join(COLUMNS[:4])}, ...)"
        )
    first: tuple | None = None
    scope = head = None
    records = []
    try:
        for line, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) != len(COLUMNS):
                raise MalformedReport(
                    f"line {line} has {len(row)} cells; the header has {len(COLUMNS)}"
                )
            cells = dict(zip(COLUMNS, row, strict=True))
            if cells["schema_version"] != str(SCHEMA_VERSION):
                raise MalformedReport(
                    f"line {line}: schema version {cells['schema_version']!r}; this program "
                    f"reads version {SCHEMA_VERSION}"
                )
            stamp = tuple(cells[c] for c in HEADER_COLUMNS if c != "record")
            if first is None:
                first = stamp
                try:
                    seq = int(cells["ledger_head_seq"])
                    count = int(cells["ledger_entry_count"])
                except ValueError:
                    raise MalformedReport(f"line {line}: the ledger head is unreadable") from None
                scope = Scope.from_label(cells["scope"], cells["consortium"])
                head = Head(seq, cells["ledger_head_hash"], count, "")
            elif stamp != first:
                raise MalformedReport(
                    f"line {line} names another scope or ledger head than line 2: "
                    "a report is made from one head"
                )
            kind = cells["record"]
            if kind not in RECORD_FIELDS:
                raise MalformedReport(f"line {line}: unknown record type {kind!r}")
            fields = RECORD_FIELDS[kind]
            for name in FIELD_COLUMNS:
                if name not in fields and cells[name] != "":
                    raise MalformedReport(
                        f"line {line}: a {kind} record has no {name}, but the cell holds "
                        f"{cells[name]!r}"
                    )
            record = {"record": kind}
            for name in fields:
                record[name] = (
                    cells["consortium"] if name == "consortium" else _typed(name, cells[name], line)
                )
            records.append(record)
    except csv.Error as exc:
        raise MalformedReport(f"unreadable CSV: {exc}") from None
    if scope is None or not records or records[0]["record"] != "report":
        raise MalformedReport("the CSV has no report line (the second line of a report)")
    head = Head(head.seq, head.entry_hash, head.entry_count, records[0].get("at") or "")
    return document_from_records(scope, head, records)


# --- JSON -----------------------------------------------------------------------------------------


def json_bytes(doc: dict) -> bytes:
    return (
        json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedReport(message)


def json_document(data: Any) -> dict:
    """Check the shape of a report's document (parsed JSON) and return it."""
    _require(isinstance(data, dict), "the JSON is not an object")
    _require(
        data.get("schema") == SCHEMA,
        f"the JSON is not a contribution report (its schema is {data.get('schema')!r})",
    )
    _require(
        data.get("schema_version") == SCHEMA_VERSION,
        f"schema version {data.get('schema_version')!r}; this program reads version "
        f"{SCHEMA_VERSION}",
    )
    Scope.from_json(data.get("scope"))
    head = data.get("ledger_head")
    _require(isinstance(head, dict), "the report names no ledger head")
    for key, kind in (("seq", int), ("entry_hash", str), ("entry_count", int), ("at", str)):
        _require(isinstance(head.get(key), kind), f"the ledger head's {key} is missing or wrong")
    for kind, group in GROUPS.items():
        items = data.get(group)
        _require(isinstance(items, list), f"the report has no {group} list")
        for i, item in enumerate(items):
            _require(isinstance(item, dict), f"{group}[{i}] is not an object")
            unknown = sorted(set(item) - set(RECORD_FIELDS[kind]))
            _require(not unknown, f"{group}[{i}] has unknown fields {', '.join(unknown)}")
    return data


def head_of(doc: dict) -> Head:
    h = doc["ledger_head"]
    return Head(h["seq"], h["entry_hash"], h["entry_count"], h.get("at") or "")
