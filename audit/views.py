"""The auditor's ledger page and its verify button, and the contribution reports' pages.

Access: ``audit.view_ledger`` / ``audit.verify_ledger`` on the consortium
(auditors and consortium administrators). The consortium is looked up among the
ones the user can see, so a consortium the user may not read and one that does
not exist give the same 404.

Reports: ``audit.export_job_report`` on the job, ``audit.export_institution_report`` on the
institution (see ``consortium.governance.permissions``), enforced by the permission-by-default base
view.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.paginator import Paginator
from django.http import FileResponse, Http404, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.utils.functional import cached_property
from django.views import View

from audit.forms import LedgerFilterForm
from audit.ledger.chain import verify_chain
from audit.ledger.selectors import ledger_event_names
from audit.models import LedgerEntry
from audit.reports.build import FORMATS, ContributionReport, ReportError, Scope, as_of, ledger_head
from audit.reports.services import CONTENT_TYPES, report_export, spool
from consortium.core.pages import first_or_404
from consortium.governance.pages import GovernancePage
from consortium.governance.selectors import consortia_visible_to, institutions_visible_to

PAGE_SIZE = 50
SESSION_KEY = "audit_ledger_verification"


def consortium_for(user, slug: str, perm: str):
    """The consortium if the user holds ``perm`` on it; otherwise the one 404."""
    consortium = consortia_visible_to(user).filter(slug=slug).first()
    if consortium is None or not user.has_perm(perm, consortium):
        raise Http404("No such consortium.")
    return consortium


def pretty_payload(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False)
    except ValueError:
        return text  # shown as stored; verification says whether it was altered


class LedgerView(LoginRequiredMixin, View):
    """The consortium's entries, newest first, filtered and paginated."""

    template_name = "audit/ledger.html"

    def get(self, request, slug):
        consortium = consortium_for(request.user, slug, "audit.view_ledger")
        entries = LedgerEntry.objects.filter(consortium_slug=consortium.slug)
        events = ledger_event_names(consortium.slug)
        institutions = consortium.institutions.order_by("slug").values_list("slug", flat=True)
        form = LedgerFilterForm(request.GET or None, events=events, institutions=institutions)
        filtered = form.filter(entries) if form.is_bound else entries
        paginator = Paginator(filtered.order_by("-seq"), PAGE_SIZE)
        page = paginator.get_page(request.GET.get("page"))
        for entry in page.object_list:
            entry.payload_pretty = pretty_payload(entry.payload_text)
        verification = request.session.pop(SESSION_KEY, None)
        if verification and verification.get("slug") != consortium.slug:
            verification = None
        return render(
            request,
            self.template_name,
            {
                "consortium": consortium,
                "form": form,
                "page_obj": page,
                "paginator": paginator,
                "entries": page.object_list,
                "verification": verification,
                "can_verify": request.user.has_perm("audit.verify_ledger", consortium),
            },
        )


class LedgerVerifyView(LoginRequiredMixin, View):
    """POST: recompute the whole chain, then redirect back with the result."""

    def get(self, request, slug):
        consortium_for(request.user, slug, "audit.verify_ledger")
        return redirect("audit:ledger", slug=slug)

    def post(self, request, slug):
        consortium = consortium_for(request.user, slug, "audit.verify_ledger")
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
        # Back to the same filtered page; only the page's own parameters are kept.
        back = QueryDict(request.POST.get("next_query", ""))
        kept = QueryDict(mutable=True)
        for key in (*LedgerFilterForm.base_fields, "page"):
            if back.get(key):
                kept[key] = back[key]
        return redirect(f"{url}?{kept.urlencode()}" if kept else url)


# --- Contribution reports -------------------------------------------------------------------


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
            summary=summary,
            withdrawals=withdrawals,
            error=error,
            formats=FORMATS,
            **kwargs,
        )

    def post(self, request, *args, **kwargs):
        fmt = request.POST.get("format", "")
        raw_head = request.POST.get("head", "")
        if fmt not in FORMATS or (raw_head and not raw_head.isdigit()):
            messages.error(request, "Choose CSV, JSON or PDF to export.")
            return redirect(request.path)
        out = spool()
        try:
            head = ledger_head(int(raw_head)) if raw_head else None
            result = report_export(
                acting_user=request.user,
                scope=self.scope(),
                fmt=fmt,
                out=out,
                head=head,
                subject=self.subject(),
            )
        except ReportError as exc:
            out.close()
            messages.error(request, f"The report could not be made: {exc}.")
            return redirect(request.path)
        out.seek(0)
        response = FileResponse(
            out, as_attachment=True, filename=result.filename, content_type=CONTENT_TYPES[fmt]
        )
        response["X-Report-SHA256"] = result.sha256
        response["X-Ledger-Head"] = f"{result.head.seq} {result.head.entry_hash}"
        response["X-Ledger-Entry"] = str(result.entry.seq)
        return response


class JobReportView(_ReportView):
    """A job's contribution report: every participant's figures."""

    permission_required = "audit.export_job_report"

    @cached_property
    def job(self):
        from training.jobs.selectors import jobs_visible_to

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
