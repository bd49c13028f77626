"""``manage.py export_contributions``: a contribution report from the command line.

    manage.py export_contributions --job 5 --format pdf --output job5.pdf
    manage.py export_contributions --institution hospital-a [--consortium SLUG] --format csv \\
        --output hospital-a.csv [--head SEQ]

The report is made from the ledger up to its current head (or ``--head SEQ``, to make again a
report made earlier: the same head gives the same bytes), written to the file, and the export is
recorded in the ledger like one from the web pages (with ``--user USERNAME`` as its actor, or
"command line (<os user>)").
"""

from __future__ import annotations

import getpass
import os

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from audit.reports.anchoring import head_anchor
from audit.reports.errors import ReportError
from audit.reports.files import FORMATS
from audit.reports.scope import institution_scope, job_scope, ledger_head
from audit.reports.services import report_export
from consortium.governance.models import Institution
from training.models import TrainingJob


class Command(BaseCommand):
    help = "Export a contribution report (CSV, JSON or PDF) for a job or an institution."

    def add_arguments(self, parser):
        scope = parser.add_mutually_exclusive_group(required=True)
        scope.add_argument("--job", type=int, help="The training job's id.")
        scope.add_argument("--institution", help="The institution's slug.")
        parser.add_argument(
            "--consortium", help="The consortium's slug (when the institution's is ambiguous)."
        )
        parser.add_argument("--format", choices=FORMATS, required=True)
        parser.add_argument("--output", required=True, help="The file to write.")
        parser.add_argument(
            "--head", type=int, help="Report up to this ledger entry (default: the current head)."
        )
        parser.add_argument("--user", help="Record the export as done by this user.")

    def handle(self, *args, job, institution, consortium, format, output, head, user, **options):
        actor = None
        if user:
            actor = get_user_model().objects.filter(username=user).first()
            if actor is None:
                raise CommandError(f"no user '{user}'")
        try:
            if job is not None:
                scope = job_scope(job)
            else:
                scope = institution_scope(institution, consortium)
            stated = ledger_head(head) if head is not None else None
            subject = self._subject(scope)
            # Written beside the target and renamed: no half-written report under its name.
            tmp = f"{output}.partial"
            try:
                with open(tmp, "wb") as out:
                    result = self._export(scope, format, out, stated, subject, actor)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
            os.replace(tmp, output)
        except ReportError as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"cannot write {output}: {exc}") from None
        self.stderr.write(
            f"{result.fmt.upper()} report for {scope.label} in {scope.consortium}, made from "
            f"ledger entry #{result.head.seq} ({result.head.entry_count} entries, head "
            f"{result.head.entry_hash}): {result.size_bytes} bytes, SHA-256 {result.sha256}; "
            f"export recorded as ledger entry #{result.entry.seq}"
        )
        # The signed, witnessed head it lies under (signed now, so that it covers the report).
        for line in head_anchor(result.head, publish=True).lines():
            self.stderr.write(line)

    def _export(self, scope, fmt, out, head, subject, actor):
        return report_export(
            acting_user=actor,
            actor_repr=None if actor else f"command line ({getpass.getuser()})",
            scope=scope,
            fmt=fmt,
            out=out,
            head=head,
            subject=subject,
        )

    @staticmethod
    def _subject(scope):
        if scope.kind == "job":
            return TrainingJob.objects.filter(pk=scope.job_id).first()
        return Institution.objects.filter(
            consortium__slug=scope.consortium, slug=scope.institution
        ).first()
