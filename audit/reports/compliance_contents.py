"""What a compliance report holds: its record types, each type's fields, its scope (one agreement
version) and its JSON document. How each record is computed from the ledger is
:mod:`audit.reports.compliance`; the files are :mod:`audit.reports.compliance_files`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from audit.reports.contents import PRIVACY_FIELDS
from audit.reports.errors import ReportError
from audit.reports.scope import Head

SCHEMA = "flc.compliance-report"
SCHEMA_VERSION = 1

# Record types in report order, the JSON document's list for each, and each type's fields.
GROUPS = {
    "job": "jobs",
    "approval": "approvals",
    "filter": "filters",
    "floor_check": "floor_checks",
    "privacy": "privacy",
    "withdrawal": "withdrawals",
    "withdrawal_effect": "withdrawal_effects",
    "refusal": "refusals",
}
_HOSPITAL = ("institution", "institution_name")  # the slug, and the name the ledger gives it
_DECIDED = ("decided_by", "at", "ledger_seq", "detail")  # who, when, which entry, why
RECORD_FIELDS: dict[str, tuple[str, ...]] = {
    "report": ("consortium", "agreement_title", "version_digest", "terms", "at"),
    "job": (
        "job_id",
        "title",
        "state",
        "spec_digest",
        "spec_matches_ledger",
        "participants",
        "proposed_by",
        "at",
        "ledger_seq",
    ),
    "approval": (
        "job_id",
        "institution",
        "institution_name",
        "decision",
        "decided_by",
        "at",
        "spec_digest",
        "agreement_version",
        "bound_to_current_spec",
        "ledger_seq",
        "detail",
    ),
    "filter": ("job_id", "step", "filter", "params"),
    "floor_check": ("job_id", "term", "required", "job_value", "ok"),
    "privacy": (*_HOSPITAL, *PRIVACY_FIELDS),
    "withdrawal": (*_HOSPITAL, *_DECIDED),
    "withdrawal_effect": (
        "institution",
        "institution_name",
        "job_id",
        "effect",
        "cause_seq",
        "cause_agreement_id",
        "at",
        "ledger_seq",
        "detail",
    ),
    "refusal": ("kind", "job_id", "title", "spec_digest", *_HOSPITAL, *_DECIDED),
}
INT_FIELDS = frozenset(
    {"job_id", "ledger_seq", "agreement_version", "step", "cause_seq", "cause_agreement_id"}
)
FLOAT_FIELDS = frozenset({"epsilon_spent", "epsilon_total", "epsilon_cap", "delta"})
BOOL_FIELDS = frozenset({"spec_matches_ledger", "bound_to_current_spec", "ok", "within_cap"})
# TOLERANT_FIELDS (ε, replayed through the accountant) are the contribution report's.


@dataclass(frozen=True)
class ComplianceScope:
    """What a compliance report covers: one version of one agreement of a consortium."""

    consortium: str
    agreement_id: int
    version: int

    def to_json(self) -> dict:
        return {
            "kind": "agreement_version",
            "consortium": self.consortium,
            "agreement_id": self.agreement_id,
            "version": self.version,
        }

    @classmethod
    def from_json(cls, data: Any) -> ComplianceScope:
        if not isinstance(data, dict) or data.get("kind") != "agreement_version":
            raise ReportError("the report's scope is not an agreement version")
        consortium, agreement, version = (
            data.get("consortium"),
            data.get("agreement_id"),
            data.get("version"),
        )
        if not isinstance(consortium, str) or not consortium:
            raise ReportError("the report's scope names no consortium")
        for name, value in (("agreement id", agreement), ("version", version)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ReportError(f"the report's scope names no {name}")
        return cls(consortium, agreement, version)

    @property
    def label(self) -> str:
        """``agreement:3:version:2`` (the CSV's scope column)."""
        return f"agreement:{self.agreement_id}:version:{self.version}"

    @classmethod
    def from_label(cls, label: str, consortium: str) -> ComplianceScope:
        parts = (label or "").split(":")
        if (
            len(parts) == 4
            and parts[0] == "agreement"
            and parts[2] == "version"
            and parts[1].isdigit()
            and parts[3].isdigit()
        ):
            return cls(consortium, int(parts[1]), int(parts[3]))
        raise ReportError(f"unreadable compliance report scope {label!r}")

    def filename(self, head: Head, fmt: str) -> str:
        return (
            f"compliance-report-{self.consortium}-agreement-{self.agreement_id}-version-"
            f"{self.version}-ledger-{head.seq}.{fmt}"
        )


def document_from_records(scope: ComplianceScope, head: Head, records) -> dict:
    """Gather records into the JSON document: header fields, then one list per record type."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "scope": scope.to_json(),
        "ledger_head": head.to_json(),
        **{group: [] for group in GROUPS.values()},
    }
    for record in records:
        kind = record["record"]
        if kind == "report":
            for name in ("agreement_title", "version_digest", "terms"):
                doc[name] = record.get(name)
            continue
        doc[GROUPS[kind]].append({name: record.get(name) for name in RECORD_FIELDS[kind]})
    return doc


def records_from_document(doc: dict) -> Iterator[dict]:
    """The inverse of :func:`document_from_records` (records in report order)."""
    yield {
        "record": "report",
        "consortium": doc["scope"]["consortium"],
        "agreement_title": doc.get("agreement_title"),
        "version_digest": doc.get("version_digest"),
        "terms": doc.get("terms"),
        "at": doc["ledger_head"].get("at") or None,
    }
    for kind, group in GROUPS.items():
        for item in doc.get(group) or []:
            yield {"record": kind, **{name: item.get(name) for name in RECORD_FIELDS[kind]}}
