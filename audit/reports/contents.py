"""What a contribution report holds: its record types, each type's fields, and its JSON document.

A report is a sequence of records (plain dicts, ``{"record": type, field: value, ...}``) in the
order of :data:`RECORD_TYPES`; its JSON document gathers them under a header, one list per type
(:func:`document_from_records`), and :func:`records_from_document` gives them back in report
order. The CSV (:mod:`audit.reports.formats`) has the union of the fields as fixed columns. How
each figure is computed from the ledger is in :mod:`audit.reports.build`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from audit.reports.scope import Head, Scope

SCHEMA = "flc.contribution-report"
SCHEMA_VERSION = 1

# Record types, in the order a report lists them (the first three come from the first pass).
RECORD_TYPES = (
    "report",
    "summary",
    "withdrawal",
    "update",
    "round_score",
    "model",
    "derived_model",
)
# The JSON document's list for each record type ("report" is the document's header).
GROUPS = {
    "summary": "summary",
    "withdrawal": "withdrawals",
    "update": "updates",
    "round_score": "round_scores",
    "model": "models",
    "derived_model": "derived_models",
}

# An institution's ε against its cap, as every report states it (the compliance report too).
PRIVACY_FIELDS = ("epsilon_spent", "epsilon_total", "epsilon_cap", "delta", "within_cap")
# Each record type's fields, in order (the CSV has the union as fixed columns).
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "report": ("consortium", "title", "at"),
    "summary": (
        "job_id",
        "institution",
        "score",
        "score_rounds_sum",
        "score_method",
        "score_metric",
        "samples",
        "rounds_participated",
        "updates_accepted",
        "updates_rejected",
        *PRIVACY_FIELDS,
    ),
    "withdrawal": ("institution", "ledger_seq", "at", "detail"),
    "update": (
        "job_id",
        "round",
        "institution",
        "status",
        "samples",
        "update_digest",
        "ledger_seq",
        "detail",
    ),
    "round_score": (
        "job_id",
        "round",
        "institution",
        "score",
        "score_method",
        "score_metric",
        "ledger_seq",
    ),
    "model": ("job_id", "round", "model_digest", "lineage_hash", "ledger_seq", "detail"),
    "derived_model": (
        "institution",
        "job_id",
        "round",
        "model_digest",
        "lineage_hash",
        "ledger_seq",
    ),
}

INT_FIELDS = frozenset(
    {
        "job_id",
        "round",
        "samples",
        "rounds_participated",
        "updates_accepted",
        "updates_rejected",
        "ledger_seq",
    }
)
FLOAT_FIELDS = frozenset(
    {"score", "score_rounds_sum", "epsilon_spent", "epsilon_total", "epsilon_cap", "delta"}
)
BOOL_FIELDS = frozenset({"within_cap"})
# Figures replayed through the accountant (scipy): compared with a relative tolerance, since
# another numerical library build may differ in the last bits. Every other figure is exact.
TOLERANT_FIELDS = frozenset({"epsilon_spent", "epsilon_total"})
EPSILON_REL_TOL = 1e-9


def document_from_records(scope: Scope, head: Head, records: Iterable[dict]) -> dict:
    """Gather records into the JSON document: header, then one list per record type."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "scope": scope.to_json(),
        "ledger_head": head.to_json(),
        "title": None,
        **{group: [] for group in GROUPS.values()},
    }
    for record in records:
        kind = record["record"]
        if kind == "report":
            doc["title"] = record.get("title")
            continue
        doc[GROUPS[kind]].append({name: record.get(name) for name in RECORD_FIELDS[kind]})
    return doc


_DETAIL_RANK = {"update": 0, "round_score": 1, "model": 2, "derived_model": 3}


def records_from_document(doc: dict) -> Iterator[dict]:
    """The inverse of :func:`document_from_records`: the records in report order (the detail
    records back in ledger order, as :meth:`ContributionReport.records` yields them)."""
    yield {
        "record": "report",
        "consortium": doc["scope"]["consortium"],
        "title": doc.get("title"),
        "at": doc["ledger_head"].get("at") or None,
    }
    details = []
    for kind, group in GROUPS.items():
        for item in doc.get(group) or []:
            record = {"record": kind, **{name: item.get(name) for name in RECORD_FIELDS[kind]}}
            if kind in _DETAIL_RANK:
                details.append(record)
            else:
                yield record
    # Stable: records of one entry keep their order (scores by institution; a model, then the
    # models derived from it).
    details.sort(key=lambda r: (r.get("ledger_seq") or 0, _DETAIL_RANK[r["record"]]))
    yield from details
