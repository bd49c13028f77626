"""The pages that compose several apps (see :mod:`consortium.dashboard`): the overview, a
consortium's dashboard and an institution's page."""

from __future__ import annotations

from django.shortcuts import redirect
from django.views.generic import TemplateView

from audit.ledger.selectors import consortium_entries
from consortium.core.access import may
from consortium.core.pages import SIGNED_IN, PermissionRequiredMixin
from consortium.dashboard.services import can_see_services, services_panel
from consortium.dashboard.tables import InstitutionTable
from consortium.dashboard.worker_keys import worker_keys
from consortium.governance import selectors
from consortium.governance.pages import GovernancePage, InstitutionScopedMixin
from consortium.governance.permissions import PLATFORM
from training.jobs.selectors import approver_inbox, institution_accountability
from training.rounds.heartbeats import site_workers
from training.rounds.live import consortium_live_state

#: Ledger entries the consortium dashboard lists (to those who may read the ledger).
RECENT_ENTRIES = 10
#: Jobs awaiting the user's decision listed under "Waiting on you" (the inbox has them all).
REVIEWS_LISTED = 5


class OverviewView(PermissionRequiredMixin, TemplateView):
    """The user's consortia; with exactly one, its dashboard directly."""

    permission_required = SIGNED_IN
    template_name = "consortium/overview.html"

    def get(self, request, *args, **kwargs):
        consortia = list(selectors.consortia_visible_to(request.user))
        if len(consortia) == 1:
            return redirect("consortium:consortium-detail", slug=consortia[0].slug)
        # An operator (superuser) may start one: the link is theirs, and nobody else's.
        can_start = may(request.user, "consortium.start_consortium", PLATFORM)
        return self.render_to_response({"consortia": consortia, "can_start_consortium": can_start})


class ConsortiumDetailView(GovernancePage):
    """The consortium's front page: its institutions and their standing under each agreement,
    what waits on the user, its jobs live, (to those who may read the ledger) its newest
    entries, and (to operators) whether the services and the site workers are up."""

    permission_required = "consortium.view_consortium"
    template_name = "consortium/consortium_detail.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        institutions = list(self.consortium.institutions.order_by("name"))
        keys = worker_keys(institutions)
        dashboard = selectors.consortium_dashboard(
            self.request.user,
            self.consortium,
            institutions_with_worker_key={i for i, k in keys.items() if k.registered},
            institutions=institutions,
        )
        # The jobs awaiting this user's decision: the approval inbox's own selector, so the
        # dashboard and the inbox cannot disagree on what waits.
        reviews = approver_inbox(self.request.user, self.consortium)
        can_view_ledger = self.can("audit.view_ledger", self.consortium)
        # Per institution, its standing under each agreement's current version; the table sorts
        # and pages by query string, and ?q= keeps the institutions whose name or slug has it.
        query = self.request.GET.get("q", "").strip()
        workers = site_workers(i.pk for i in dashboard.institutions)
        rows = []
        for institution in dashboard.institutions:
            if query and query.lower() not in f"{institution.name} {institution.slug}".lower():
                continue
            row = {
                "institution": institution,
                "name": institution.name,
                "country": institution.country,
                "worker_key": keys[institution.pk],
                "worker_key_order": len(keys[institution.pk].signing_keys),
                "worker": workers[institution.pk],
                "worker_order": workers[institution.pk].sort_key,
            }
            for i, status in enumerate(dashboard.statuses):
                standing = _standing(status, institution)
                row[f"standing_{i}"] = standing
                row[f"standing_{i}_key"] = standing["label"]
            rows.append(row)
        table = InstitutionTable.for_dashboard(
            rows, [s.agreement.title for s in dashboard.statuses], self.request
        )
        return super().get_context_data(
            dashboard=dashboard,
            reviews=reviews[:REVIEWS_LISTED],
            reviews_count=len(reviews),
            institutions_table=table,
            institution_query=query,
            can_view_ledger=can_view_ledger,
            consortium_live=consortium_live_state(self.consortium),
            recent_entries=(
                consortium_entries(self.consortium.slug).order_by("-seq")[:RECENT_ENTRIES]
                if can_view_ledger
                else []
            ),
            # Operators only: the central services and every site worker, red when down.
            services=(
                services_panel(dashboard.institutions, workers)
                if can_see_services(self.request.user, self.consortium)
                else None
            ),
            can_add_institution=self.can("consortium.add_institution", self.consortium),
            can_manage_agreements=self.can("consortium.manage_agreements", self.consortium),
            **kwargs,
        )


def _standing(status: selectors.AgreementStatus, institution) -> dict:
    """One institution's signature state under an agreement, for a badge."""
    if any(w.institution_id == institution.pk for w in status.withdrawn):
        return {"label": "withdrawn", "tone": "bad", "status": status}
    if status.version is None:
        return {"label": "no published version", "tone": "", "status": status}
    signature = next((s for s in status.signed if s.institution_id == institution.pk), None)
    if signature:
        return {
            "label": f"signed v{status.version.number}",
            "tone": "ok",
            "status": status,
            "signature": signature,
        }
    return {"label": f"v{status.version.number} unsigned", "tone": "warn", "status": status}


class InstitutionDetailView(InstitutionScopedMixin, GovernancePage):
    """An institution's page: its members, signatures and withdrawals, its workers' signing
    keys (those of its active credentials, which uploads are verified against), whether its
    site's workers are online (their heartbeats), and its contributions and privacy spent job
    by job (issue 5)."""

    permission_required = "consortium.view_institution"
    template_name = "consortium/institution_detail.html"

    def get_context_data(self, **kwargs):
        institution = self.institution
        return super().get_context_data(
            memberships=selectors.memberships_visible_to(self.request.user).filter(
                institution=institution
            ),
            signatures=institution.signatures.select_related("version__agreement").order_by(
                "-signed_at"
            ),
            withdrawals=institution.withdrawals.select_related("agreement"),
            worker_keys=worker_keys([institution])[institution.pk],
            site_workers=site_workers([institution.pk])[institution.pk],
            can_edit=self.can("consortium.change_institution", institution),
            accountability=institution_accountability(self.request.user, institution),
            **kwargs,
        )
