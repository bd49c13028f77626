"""Checking a compliance report against the ledger it names (``manage.py verify_report``).

The same steps as a contribution report's (:mod:`audit.reports.verify`, whose head check and
outcome it shares): read the file back, check the head is in a chain that verifies up to it,
recompute the report from the ledger up to that head and compare every figure, render the file
again and compare bytes (a PDF whose pages differ fails; a re-saved CSV or JSON is noted), and
say which ``report.compliance_exported`` entry records this very file's SHA-256.
"""

from __future__ import annotations

from audit.ledger import events as ledger_events
from audit.ledger.selectors import ExportRecord, consortium_entries
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import GROUPS, RECORD_FIELDS, ComplianceScope
from audit.reports.compliance_files import COMPLIANCE
from audit.reports.contents import TOLERANT_FIELDS
from audit.reports.scope import Head
from audit.reports.verify import Difference, Outcome, compare_groups, verify_file

HEADER_FIELDS = ("agreement_title", "version_digest", "terms")


def _label(kind: str, record: dict) -> str:
    where = f"job {record['job_id']}" if record.get("job_id") is not None else ""
    who = record.get("institution") or ""
    entry = f"entry #{record['ledger_seq']}" if record.get("ledger_seq") is not None else ""
    return " ".join(x for x in (kind.replace("_", " "), where, who, entry) if x)


def compare_compliance(report: dict, ledger: dict) -> list[Difference]:
    """Every figure of ``report`` that differs from ``ledger`` (the recomputed document)."""
    out = [
        Difference("the report's header", name, report.get(name), ledger.get(name))
        for name in HEADER_FIELDS
        if report.get(name) != ledger.get(name)
    ]
    return out + compare_groups(report, ledger, GROUPS, RECORD_FIELDS, _label, TOLERANT_FIELDS)


def _export_of(digest: str, scope: ComplianceScope) -> ExportRecord | None:
    """The first ``report.compliance_exported`` entry of the consortium naming ``digest``."""
    row = (
        consortium_entries(scope.consortium)
        .filter(event=ledger_events.COMPLIANCE_EXPORTED, payload_text__contains=digest)
        .order_by("seq")
        .values_list("seq", "actor_repr", "created_at")
        .first()
    )
    return ExportRecord(*row) if row else None


def _recompute(scope: ComplianceScope, head: Head) -> dict:
    return ComplianceReport(scope, head).document()


def verify_compliance_bytes(data: bytes) -> Outcome:
    """Verify a compliance report file; raises MalformedReport for an unreadable one."""
    return verify_file(data, COMPLIANCE, _recompute, compare_compliance, GROUPS, _export_of)
