"""The reports' two errors, below every other module of :mod:`audit.reports` so each can raise
them: a report that cannot be made from the ledger, and a file that is not a readable report."""

from __future__ import annotations


class ReportError(Exception):
    """A report that cannot be made (unknown job or institution, a head not in the ledger)."""


class MalformedReport(ReportError):
    """A file that is not a readable contribution report; the message says what is wrong."""
