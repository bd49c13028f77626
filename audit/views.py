"""The auditor's ledger page and its verify button.

Access: ``audit.view_ledger`` / ``audit.verify_ledger`` on the consortium
(auditors and consortium administrators). The consortium is looked up among the
ones the user can see, so a consortium the user may not read and one that does
not exist give the same 404.
"""

from __future__ import annotations

import json

from django.contrib import messages
from django.contrib.auth.mixins import LoginRequiredMixin
from django.core.paginator import Paginator
from django.http import Http404, QueryDict
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views import View

from consortium.selectors import consortia_visible_to

from .forms import LedgerFilterForm
from .ledger import verify_chain
from .models import LedgerEntry

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
        events = entries.order_by("event").values_list("event", flat=True).distinct()
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
