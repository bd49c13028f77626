"""``manage.py verify_report FILE``: check a contribution or compliance report against the ledger
it names (the kind is recognised by the file's content).

Exit status 0 when the named head is in the chain, the chain verifies up to it and every figure
matches the report recomputed from the ledger; 1 when anything differs (each differing figure is
named); 2 when the file cannot be read as a contribution report. See :mod:`audit.reports.verify`.

It also states the ledger's newest signed checkpoint and the sites that witnessed it, and proves
the report's head entry is in that checkpoint's tree (:mod:`audit.reports.anchoring`); a head
that is not (the ledger was rewritten under a checkpoint the sites hold) fails the check too.
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from audit.reports.anchoring import head_anchor
from audit.reports.compliance_files import is_compliance_file
from audit.reports.compliance_verify import verify_compliance_bytes
from audit.reports.errors import MalformedReport, ReportError
from audit.reports.verify import MAX_LISTED, verify_report_bytes


class Command(BaseCommand):
    help = (
        "Check that a contribution or compliance report (CSV, JSON or PDF) matches the ledger "
        "it names."
    )

    def add_arguments(self, parser):
        parser.add_argument("file", help="The report file.")

    def handle(self, *args, file, **options):
        try:
            with open(file, "rb") as handle:
                data = handle.read()
        except OSError as exc:
            raise CommandError(f"cannot read {file}: {exc.strerror or exc}", returncode=2) from None
        compliance = is_compliance_file(data)
        kind = "compliance" if compliance else "contribution"
        try:
            outcome = (verify_compliance_bytes if compliance else verify_report_bytes)(data)
        except (MalformedReport, ReportError) as exc:
            raise CommandError(
                f"{file} is not a readable {kind} report: {exc}", returncode=2
            ) from None
        head = outcome.head
        self.stdout.write(
            f"{file}: {outcome.fmt.upper()} {kind} report for {outcome.scope.label} in "
            f"{outcome.scope.consortium}, made from ledger entry #{head.seq} "
            f"({head.entry_count} entries, head {head.entry_hash})"
        )
        for line in outcome.matched:
            self.stdout.write(self.style.SUCCESS(f"  match: {line}"))
        for difference in outcome.differences[:MAX_LISTED]:
            self.stdout.write(self.style.ERROR(f"  DIFFERS: {difference}"))
        if len(outcome.differences) > MAX_LISTED:
            self.stdout.write(
                self.style.ERROR(f"  ... and {len(outcome.differences) - MAX_LISTED} more")
            )
        for line in outcome.failed:
            self.stdout.write(self.style.ERROR(f"  FAILED: {line}"))
        for line in outcome.notes:
            self.stdout.write(f"  note: {line}")
        anchor = head_anchor(head)
        for line in anchor.lines():
            self.stdout.write(line if anchor.ok else self.style.ERROR(line))
        if not anchor.ok:
            outcome.fail(anchor.problem)
        if not outcome.ok:
            raise CommandError(
                f"{file} does NOT match the ledger: {'; '.join(outcome.failed)}", returncode=1
            )
        self.stdout.write(self.style.SUCCESS(f"{file} matches the ledger."))
