"""The CSV and JSON conventions every report of this app follows, written once for all of them.

A report (the contribution report, :mod:`audit.reports.formats`; the compliance report,
:mod:`audit.reports.compliance_files`) is a list of typed records. Its CSV has fixed columns: a
header block every row repeats (schema version, record type, scope, consortium, ledger head), so a
row copied out of the file still says where it came from, then one column per record field. Its
JSON is the document indented with sorted keys. What differs between reports (the columns, the
record types and their fields, which fields are numbers or yes/no, how the scope is read back) is a
:class:`RecordLayout`; the writing, the reading back and their error messages are here, so the two
reports cannot drift apart in how they escape a cell or reject a malformed file.

Cells: numbers are written as Python writes them (``repr`` for floats: read back bit for bit);
empty cells are "no value"; text that a spreadsheet could take for a formula (starting with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return) gets a leading apostrophe, and so does text that
already starts with one, so that reading back (drop one leading apostrophe) is exact.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from audit.reports.errors import MalformedReport
from audit.reports.scope import Head

HEADER_COLUMNS = (
    "schema_version",
    "record",
    "scope",
    "consortium",
    "ledger_head_seq",
    "ledger_head_hash",
    "ledger_entry_count",
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
CSV_ROWS_PER_CHUNK = 256


def escape_cell(text: str) -> str:
    """A text cell as written: a leading apostrophe where a spreadsheet could see a formula."""
    return "'" + text if text.startswith(_FORMULA_START) else text


def unescape_cell(text: str) -> str:
    return text[1:] if text.startswith("'") else text


def json_bytes(doc: dict) -> bytes:
    return (
        json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n"
    ).encode("utf-8")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise MalformedReport(message)


def head_of(doc: dict) -> Head:
    """The ledger head a report's document names."""
    h = doc["ledger_head"]
    return Head(h["seq"], h["entry_hash"], h["entry_count"], h.get("at") or "")


@dataclass(frozen=True)
class RecordLayout:
    """What one kind of report puts in its files.

    ``scope_from_cells(scope_cell, consortium_cell)`` reads the scope back from a CSV row;
    ``unescape_header`` says whether those two cells are unescaped first (the contribution report
    reads them as they stand, as it always has: its labels never start like a formula).
    """

    what: str
    schema: str
    schema_version: int
    field_columns: tuple[str, ...]
    record_fields: dict[str, tuple[str, ...]]
    groups: dict[str, str]
    int_fields: frozenset[str]
    float_fields: frozenset[str]
    bool_fields: frozenset[str]
    scope_from_cells: Callable[[str, str], Any]
    scope_from_json: Callable[[Any], Any]
    document_from_records: Callable[[Any, Head, list[dict]], dict]
    unescape_header: bool = False

    @classmethod
    def of(
        cls, contents: Any, *, what: str, field_columns: tuple[str, ...], scope_class: Any, **kw
    ) -> RecordLayout:
        """The layout of a report whose contents module (``SCHEMA``, ``RECORD_FIELDS``,
        ``GROUPS``, the typed field sets, ``document_from_records``) is ``contents``, and whose
        scope class reads itself back with ``from_label`` and ``from_json``."""
        return cls(
            what,
            contents.SCHEMA,
            contents.SCHEMA_VERSION,
            field_columns,
            contents.RECORD_FIELDS,
            contents.GROUPS,
            contents.INT_FIELDS,
            contents.FLOAT_FIELDS,
            contents.BOOL_FIELDS,
            scope_class.from_label,
            scope_class.from_json,
            contents.document_from_records,
            **kw,
        )

    @property
    def columns(self) -> tuple[str, ...]:
        return HEADER_COLUMNS + self.field_columns

    @cached_property
    def _plans(self) -> dict[str, tuple[tuple[int, str], ...]]:
        index = {name: i for i, name in enumerate(self.field_columns)}
        return {
            kind: tuple((index[name], name) for name in fields if name != "consortium")
            for kind, fields in self.record_fields.items()
        }

    # --- writing ----------------------------------------------------------------------------

    def cell(self, name: str, value: Any) -> str:
        kind = type(value)
        if value is None:
            return ""
        if kind is str:
            return escape_cell(value)
        if kind is bool or name in self.bool_fields:
            return "yes" if value else "no"
        if kind is int:
            return str(value)
        if kind is float:
            return repr(value)
        return escape_cell(str(value))

    def row_writer(self, scope: Any, head: Head) -> Callable[[dict], list[str]]:
        """A function turning a record into the CSV's cells (:attr:`columns` order). The
        columns every row repeats are formatted once; each record fills only its own columns."""
        cell = self.cell
        prefix = [
            cell("schema_version", self.schema_version),
            "",
            cell("scope", scope.label),
            cell("consortium", scope.consortium),
            cell("ledger_head_seq", head.seq),
            cell("ledger_head_hash", head.entry_hash),
            cell("ledger_entry_count", head.entry_count),
        ]
        blank = [""] * len(self.field_columns)
        plans = self._plans

        def cells(record: dict) -> list[str]:
            kind = record["record"]
            row = prefix.copy()
            row[1] = kind
            fields = blank.copy()
            get = record.get
            for index, name in plans[kind]:
                value = get(name)
                if value is not None:
                    fields[index] = cell(name, value)
            row += fields
            return row

        return cells

    def iter_csv(self, scope: Any, head: Head, records: Iterable[dict]) -> Iterator[str]:
        """The CSV text in chunks of rows, as the records come (nothing is held back)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\r\n")
        writer.writerow(self.columns)
        cells = self.row_writer(scope, head)
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

    # --- reading back -----------------------------------------------------------------------

    def typed(self, name: str, cell: str, line: int) -> Any:
        if cell == "":
            return None
        try:
            if name in self.int_fields:
                if not re.fullmatch(r"-?\d+", cell):
                    raise ValueError
                return int(cell)
            if name in self.float_fields:
                return float(cell)
        except ValueError:
            raise MalformedReport(
                f"line {line}: column {name} holds {cell!r}, not a number"
            ) from None
        if name in self.bool_fields:
            if cell not in ("yes", "no"):
                raise MalformedReport(f"line {line}: column {name} holds {cell!r}, not yes or no")
            return cell == "yes"
        return unescape_cell(cell)

    def csv_document(self, text: str) -> dict:
        """Read a report CSV back into the report's document (what :meth:`json_document`
        gives)."""
        columns = self.columns
        header_text = unescape_cell if self.unescape_header else str
        reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
        try:
            header = next(reader)
        except StopIteration:
            raise MalformedReport("the file is empty") from None
        except csv.Error as exc:
            raise MalformedReport(f"line 1: {exc}") from None
        if tuple(header) != columns:
            raise MalformedReport(
                f"the first line is not the header of a {self.what} CSV (expected the "
                f"columns {', '.join(columns[:4])}, ...)"
            )
        first: tuple | None = None
        scope = head = None
        records = []
        try:
            for line, row in enumerate(reader, start=2):
                if not row:
                    continue
                if len(row) != len(columns):
                    raise MalformedReport(
                        f"line {line} has {len(row)} cells; the header has {len(columns)}"
                    )
                cells = dict(zip(columns, row, strict=True))
                if cells["schema_version"] != str(self.schema_version):
                    raise MalformedReport(
                        f"line {line}: schema version {cells['schema_version']!r}; this program "
                        f"reads version {self.schema_version}"
                    )
                stamp = tuple(cells[c] for c in HEADER_COLUMNS if c != "record")
                consortium = header_text(cells["consortium"])
                if first is None:
                    first = stamp
                    try:
                        seq = int(cells["ledger_head_seq"])
                        count = int(cells["ledger_entry_count"])
                    except ValueError:
                        raise MalformedReport(
                            f"line {line}: the ledger head is unreadable"
                        ) from None
                    scope = self.scope_from_cells(header_text(cells["scope"]), consortium)
                    head = Head(seq, cells["ledger_head_hash"], count, "")
                elif stamp != first:
                    raise MalformedReport(
                        f"line {line} names another scope or ledger head than line 2: "
                        "a report is made from one head"
                    )
                kind = cells["record"]
                if kind not in self.record_fields:
                    raise MalformedReport(f"line {line}: unknown record type {kind!r}")
                fields = self.record_fields[kind]
                for name in self.field_columns:
                    if name not in fields and cells[name] != "":
                        raise MalformedReport(
                            f"line {line}: a {kind} record has no {name}, but the cell holds "
                            f"{cells[name]!r}"
                        )
                record = {"record": kind}
                for name in fields:
                    record[name] = (
                        consortium if name == "consortium" else self.typed(name, cells[name], line)
                    )
                records.append(record)
        except csv.Error as exc:
            raise MalformedReport(f"unreadable CSV: {exc}") from None
        if scope is None or not records or records[0]["record"] != "report":
            raise MalformedReport("the CSV has no report line (the second line of a report)")
        head = Head(head.seq, head.entry_hash, head.entry_count, records[0].get("at") or "")
        return self.document_from_records(scope, head, records)

    def json_document(self, data: Any) -> dict:
        """Check the shape of a report's document (parsed JSON) and return it."""
        require(isinstance(data, dict), "the JSON is not an object")
        require(
            data.get("schema") == self.schema,
            f"the JSON is not a {self.what} (its schema is {data.get('schema')!r})",
        )
        require(
            data.get("schema_version") == self.schema_version,
            f"schema version {data.get('schema_version')!r}; this program reads version "
            f"{self.schema_version}",
        )
        self.scope_from_json(data.get("scope"))
        head = data.get("ledger_head")
        require(isinstance(head, dict), "the report names no ledger head")
        for key, kind in (("seq", int), ("entry_hash", str), ("entry_count", int), ("at", str)):
            require(isinstance(head.get(key), kind), f"the ledger head's {key} is missing or wrong")
        for kind, group in self.groups.items():
            items = data.get(group)
            require(isinstance(items, list), f"the report has no {group} list")
            for i, item in enumerate(items):
                require(isinstance(item, dict), f"{group}[{i}] is not an object")
                unknown = sorted(set(item) - set(self.record_fields[kind]))
                require(not unknown, f"{group}[{i}] has unknown fields {', '.join(unknown)}")
        return data
