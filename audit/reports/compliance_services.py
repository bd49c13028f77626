"""Writes of the compliance report: the export and its ledger entry.

As for a contribution report (:mod:`audit.reports.services`, whose spool and content types it
uses), the file is built before anything is sent, so the export's entry, naming the file's
SHA-256 and the head it was made from, is committed before the first byte leaves.
"""

from __future__ import annotations

from typing import BinaryIO

from audit.ledger import events as ledger_events
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import SCHEMA_VERSION, ComplianceScope
from audit.reports.compliance_files import write_compliance
from audit.reports.scope import Head, ledger_head
from audit.reports.services import ExportKind, ExportResult, check_format, write_and_record

# What was exported: the same record as for a contribution report.
ComplianceExport = ExportResult

COMPLIANCE_EXPORT = ExportKind(write_compliance, SCHEMA_VERSION)


def compliance_export(
    *,
    acting_user,
    scope: ComplianceScope,
    fmt: str,
    out: BinaryIO,
    head: Head | None = None,
    subject=None,
    actor_repr: str | None = None,
) -> ComplianceExport:
    """Write the compliance report for ``scope`` (up to ``head``, default the current head) as
    ``fmt`` to ``out``, then record the export in the ledger (``report.compliance_exported``):
    who, the version, the format, the file's SHA-256 and size, and the head it was made from.
    ``subject`` is the agreement version, so the export shows in its history."""
    check_format(fmt)
    report = ComplianceReport(scope, head or ledger_head())
    return write_and_record(
        ledger_events.COMPLIANCE_EXPORTED,
        COMPLIANCE_EXPORT,
        report,
        fmt,
        out,
        acting_user,
        actor_repr,
        subject,
    )
