"""The auditor's ledger page and its verify button, and the contribution reports' pages.

Every page goes through the fail-closed page base (``consortium.core.pages``, by way of
``consortium.governance.pages``): the consortium is looked up among the ones the user can see,
and the permission is checked on it, so a consortium the user may not read and one that does not
exist give the same 404.

Ledger: ``audit.view_ledger`` / ``audit.verify_ledger`` on the consortium (auditors and
consortium administrators). Compliance reports: ``audit.view_ledger`` on the consortium too (the
report is the ledger read for one agreement version, so whoever reads the whole ledger reads it;
an approver, who may not, gets the same 404 as an outsider). Contribution reports:
``audit.export_job_report`` on the job, ``audit.export_institution_report`` on the institution.
The rules are in ``audit.permissions``; the ledger is read through ``audit.ledger.selectors``.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.http import FileResponse, HttpResponse, QueryDict
from django.shortcuts import redirect
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property

from audit.forms import LedgerFilterForm
from audit.ledger.chain import verify_chain
from audit.ledger.selectors import consortium_entries, ledger_event_names
from audit.reports.anchoring import head_anchor
from audit.reports.build import ContributionReport
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import ComplianceScope
from audit.reports.compliance_services import compliance_export
from audit.reports.errors import ReportError
from audit.reports.files import FORMATS
from audit.reports.scope import Scope, as_of, ledger_head
from audit.reports.services import CONTENT_TYPES, report_export, spool
from consortium.core.keyset import KeysetForm, keyset_page
from consortium.core.pages import first_or_404
from consortium.governance.pages import GovernanceAction, GovernancePage
from consortium.governance.selectors import institutions_visible_to, versions_visible_to
from training.jobs.selectors import jobs_visible_to

PAGE_SIZE = 50
SESSION_KEY = "audit_ledger_verification"


def pretty_payload(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text  # shown as stored; verification says whether it was altered


class LedgerView(GovernancePage):
    """The consortium's entries, newest first, filtered, fifty a page.

    Paged by keyset (``?before=<seq>`` older, ``?after=<seq>`` newer: ``consortium.core.keyset``),
    not by page number: numbering pages needs a count of the consortium's entries, which
    grows with the ledger (about 35 ms on PostgreSQL at 100,000), while a keyset page reads
    its fifty through the ``(consortium_slug, seq)`` index. A bad position, like a bad filter,
    is shown as an error above the newest entries.
    """

    permission_required = "audit.view_ledger"
    template_name = "audit/ledger.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        consortium, request = self.consortium, self.request
        entries = consortium_entries(consortium.slug)
        events = ledger_event_names(consortium.slug)
        institutions = consortium.institutions.order_by("slug").values_list("slug", flat=True)
        form = LedgerFilterForm(request.GET or None, events=events, institutions=institutions)
        filtered = form.filter(entries) if form.is_bound else entries
        position = KeysetForm(request.GET or None)
        before, after = position.position()
        page = keyset_page(filtered, key="seq", size=PAGE_SIZE, before=before, after=after)
        for entry in page.items:
            entry.payload_pretty = pretty_payload(entry.payload_text)
        verification = request.session.pop(SESSION_KEY, None)
        if verification and verification.get("slug") != consortium.slug:
            verification = None
        return super().get_context_data(
            form=form,
            keyset=page,
            position_errors=position.problems(),
            entries=page.items,
            verification=verification,
            can_verify=self.can("audit.verify_ledger", consortium),
            compliance_versions=versions_visible_to(request.user)
            .filter(agreement__consortium=consortium, status="published")
            .select_related("agreement")
            .order_by("agreement__title", "agreement_id", "number"),
            **kwargs,
        )


class LedgerVerifyView(GovernanceAction):
    """POST: recompute the whole chain, then redirect back with the result."""

    permission_required = "audit.verify_ledger"
    # GET (and HEAD, OPTIONS) as before: a GET of the verify URL goes back to the ledger page.
    http_method_names = ["get", "post", "head", "options"]

    def get_permission_object(self):
        return self.consortium

    def get(self, request, slug):
        return redirect("audit:ledger", slug=slug)

    def post(self, request, slug):
        consortium = self.consortium
        result = verify_chain()
        request.session[SESSION_KEY] = {
            "slug": consortium.slug,
            "ok": result.ok,
            "entry_count": result.entry_count,
            "head_hash": result.head_hash,
            "first_bad_seq": result.first_bad_seq,
            "reason": result.reason,
            "at": timezone.now().isoformat(timespec="seconds"),
        }
        if result.ok:
            messages.success(
                request,
                f"Ledger intact: {result.entry_count} entries verified, "
                f"head hash {result.head_hash}.",
            )
        else:
            messages.error(
                request,
                f"Ledger broken at entry #{result.first_bad_seq}: {result.reason}.",
            )
        url = reverse("audit:ledger", kwargs={"slug": consortium.slug})
        # Back to the same filtered page at the same position; only the page's own parameters
        # are kept.
        back = QueryDict(request.POST.get("next_query", ""))
        kept = QueryDict(mutable=True)
        for key in (*LedgerFilterForm.base_fields, *KeysetForm.base_fields):
            if back.get(key):
                kept[key] = back[key]
        return redirect(f"{url}?{kept.urlencode()}" if kept else url)


# --- Contribution reports -------------------------------------------------------------------


def export_response(out, result) -> FileResponse:
    """The exported file (spooled in ``out``), with its digest, head and export entry in the
    headers: the response of every report export."""
    out.seek(0)
    response = FileResponse(
        out, as_attachment=True, filename=result.filename, content_type=CONTENT_TYPES[result.fmt]
    )
    response["X-Report-SHA256"] = result.sha256
    response["X-Ledger-Head"] = f"{result.head.seq} {result.head.entry_hash}"
    response["X-Ledger-Entry"] = str(result.entry.seq)
    return response


def export_from_post(request, export, scope, subject) -> HttpResponse:
    """Answer a report page's export form: check the chosen format and head, then ``export``
    (:func:`~audit.reports.services.report_export` or its compliance twin) ``scope`` into a
    spool and send the file, or say why it could not be made. Every report page exports
    through here, with the same checks and messages."""
    fmt = request.POST.get("format", "")
    raw_head = request.POST.get("head", "")
    if fmt not in FORMATS or (raw_head and not raw_head.isdigit()):
        messages.error(request, "Choose CSV, JSON or PDF to export.")
        return redirect(request.path)
    out = spool()
    try:
        head = ledger_head(int(raw_head)) if raw_head else None
        result = export(
            acting_user=request.user, scope=scope, fmt=fmt, out=out, head=head, subject=subject
        )
    except ReportError as exc:
        out.close()
        messages.error(request, f"The report could not be made: {exc}.")
        return redirect(request.path)
    return export_response(out, result)


class _ReportView(GovernancePage):
    """The report's page (GET: the summary at the current ledger head, and the export buttons)
    and its export (POST ``format`` and the ``head`` the page showed: the file is made from that
    head, recorded in the ledger, then sent; see ``audit.reports.services`` for why it is
    spooled)."""

    template_name = "audit/report.html"

    def scope(self) -> Scope:
        raise NotImplementedError

    def subject(self):
        return self.get_permission_object()

    def get_context_data(self, **kwargs):
        scope = self.scope()
        head = ledger_head()
        summary, withdrawals, error = [], [], ""
        try:
            for record in ContributionReport(scope, head).summary_records():
                if record["record"] == "summary":
                    summary.append(record)
                elif record["record"] == "withdrawal":
                    withdrawals.append(record)
        except ReportError as exc:
            error = str(exc)
        return super().get_context_data(
            scope=scope,
            head=head,
            as_of=as_of(head),
            anchor=head_anchor(head),
            summary=summary,
            withdrawals=withdrawals,
            error=error,
            formats=FORMATS,
            **kwargs,
        )

    def post(self, request, *args, **kwargs):
        return export_from_post(request, report_export, self.scope(), self.subject())


class JobReportView(_ReportView):
    """A job's contribution report: every participant's figures."""

    permission_required = "audit.export_job_report"

    @cached_property
    def job(self):
        return first_or_404(
            jobs_visible_to(self.request.user), consortium=self.consortium, pk=self.kwargs["pk"]
        )

    def get_permission_object(self):
        return self.job

    def scope(self) -> Scope:
        return Scope("job", self.consortium.slug, job_id=self.job.pk)

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            job=self.job,
            back_url=reverse("training:job-detail", args=[self.consortium.slug, self.job.pk]),
            **kwargs,
        )


class InstitutionReportView(_ReportView):
    """An institution's contribution report, across the jobs it took part in."""

    permission_required = "audit.export_institution_report"

    @cached_property
    def institution(self):
        return first_or_404(
            institutions_visible_to(self.request.user),
            consortium=self.consortium,
            slug=self.kwargs["inst_slug"],
        )

    def get_permission_object(self):
        return self.institution

    def scope(self) -> Scope:
        return Scope("institution", self.consortium.slug, institution=self.institution.slug)

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            institution=self.institution,
            back_url=reverse(
                "consortium:institution-detail", args=[self.consortium.slug, self.institution.slug]
            ),
            **kwargs,
        )


# --- Compliance reports (issue 14) -------------------------------------------------------------


class ComplianceReportView(GovernancePage):
    """An agreement version's compliance report: GET shows it at the current ledger head with
    the export buttons; POST ``format`` and the ``head`` the page showed exports it (recorded in
    the ledger as ``report.compliance_exported``, then sent)."""

    permission_required = "audit.view_ledger"
    # Reading it is reading the ledger; exporting it (the POST) lets it out, an act that needs
    # a second factor where one is required (consortium.core.second_factor).
    second_factor_on_post = True
    template_name = "audit/compliance_report.html"

    @cached_property
    def version(self):
        return first_or_404(
            versions_visible_to(self.request.user).select_related("agreement"),
            agreement__consortium=self.consortium,
            agreement_id=self.kwargs["agreement_pk"],
            number=self.kwargs["number"],
            status="published",
        )

    def get_permission_object(self):
        # The version is looked up first: a version the user cannot see is a 404 either way.
        return self.version.agreement.consortium

    def scope(self) -> ComplianceScope:
        return ComplianceScope(self.consortium.slug, self.version.agreement_id, self.version.number)

    def get_context_data(self, **kwargs):
        head = ledger_head()
        doc, error = None, ""
        try:
            doc = ComplianceReport(self.scope(), head).document()
        except ReportError as exc:
            error = str(exc)
        for records in (doc or {}).values():
            for record in records if isinstance(records, list) else []:
                # The page shows ledger times to the second, with their zone (the files keep
                # the ledger's exact ISO 8601 times).
                at = record.get("at")
                record["at"] = f"{at[:19].replace('T', ' ')} UTC" if at else None
        return super().get_context_data(
            version=self.version,
            agreement=self.version.agreement,
            head=head,
            as_of=as_of(head),
            anchor=head_anchor(head),
            doc=doc,
            terms=json.loads(doc["terms"]) if doc and doc.get("terms") else {},
            error=error,
            formats=FORMATS,
            back_url=reverse(
                "consortium:version-detail",
                args=[self.consortium.slug, self.version.agreement_id, self.version.number],
            ),
            **kwargs,
        )

    def post(self, request, *args, **kwargs):
        return export_from_post(request, compliance_export, self.scope(), self.version)
