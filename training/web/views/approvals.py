"""Pages for approvers: the inbox of jobs waiting on their institutions, and the review page
where they decide.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect

from consortium.core.errors import ConflictError, ServiceError
from consortium.core.pages import apply_service_errors
from consortium.governance.models import Role
from consortium.governance.pages import (
    ActsForOneOfMyInstitutions,
    GovernanceForm,
    GovernancePage,
)
from consortium.governance.permissions import grants_of
from training.jobs import selectors
from training.jobs.approvals import approval_decide
from training.jobs.central_validation import uploaded_summary
from training.jobs.describe import describe_contribution, describe_evaluation
from training.models import Approval, JobState
from training.rounds.heartbeats import site_workers
from training.web.forms import DecisionForm
from training.web.presenters import job_review
from training.web.views.mixins import JobMixin, job_detail_url

INBOX_PER_PAGE = 25


class ApprovalInboxView(GovernancePage):
    """Jobs of this consortium waiting on one of the user's institutions."""

    permission_required = "consortium.view_consortium"
    template_name = "training/approval_inbox.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        inbox = selectors.approver_inbox(self.request.user, self.consortium)
        page = Paginator(inbox, INBOX_PER_PAGE).get_page(self.request.GET.get("page"))
        pending = page.object_list
        is_approver = any(
            g.consortium_id == self.consortium.pk and g.role == Role.APPROVER
            for g in grants_of(self.request.user)
        )
        return super().get_context_data(
            pending=pending, page_obj=page, is_approver=is_approver, **kwargs
        )


class JobReviewView(ActsForOneOfMyInstitutions, JobMixin, GovernanceForm):
    """What the job will do with the approver's data, in plain words, whether each
    participating site's worker is online (so an approver does not approve a job that no
    worker will run), and the decision form. The form carries the digest and agreement
    version that were shown: if either changed before the decision arrives, the decision
    is refused as stale and the current job is shown instead."""

    permission_required = "training.decide_job"
    template_name = "training/job_review.html"
    form_class = DecisionForm
    stale_message = ""

    def approver_institutions(self):
        """The user's institutions that take part (actively) in the job."""
        return selectors.institutions_user_decides_for(self.request.user, self.job)

    def institution_choices(self):
        return self.approver_institutions()

    def nothing_to_choose_message(self) -> str:
        return (
            f"You approve for no institution taking part in job #{self.job.pk}: there is "
            "nothing for you to decide. Each participating institution's approver decides."
        )

    def nothing_to_choose_url(self) -> str:
        return job_detail_url(self.job)

    def awaiting(self):
        decided = selectors.current_decisions(self.job)
        return self.approver_institutions().exclude(pk__in=list(decided))

    def get_initial(self):
        return {
            "spec_digest": self.job.spec_digest,
            "agreement_version_id": self.job.agreement_version_id,
            "institution": self.awaiting().first(),
        }

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        kwargs["institutions"] = self.awaiting()
        return kwargs

    def get_form(self, form_class=None):
        return self._single_institution_hidden(super().get_form(form_class))

    def _decision_form(self, *, initial):
        return self._single_institution_hidden(
            DecisionForm(initial=initial, institutions=self.awaiting())
        )

    @staticmethod
    def _single_institution_hidden(form):
        """With one institution to decide for, the page names it; no choice to make."""
        field = form.fields["institution"]
        if field.queryset.count() <= 1:
            field.widget = field.hidden_widget()
        return form

    def get_context_data(self, **kwargs):
        job = self.job
        decisions = selectors.current_decisions(job)
        institutions = list(self.approver_institutions())
        awaiting = [i for i in institutions if i.pk not in decisions]
        participants = [p.institution for p in selectors.active_participants(job)]
        workers = site_workers(i.pk for i in participants)
        return super().get_context_data(
            site_workers=[(i, workers[i.pk]) for i in participants],
            review=job_review(job, institutions, decisions),
            contribution_text=describe_contribution(job.spec),
            evaluation_text=describe_evaluation(job.spec, uploaded=uploaded_summary(job)),
            awaiting=awaiting,
            open_for_decision=job.state == JobState.AWAITING_APPROVAL and bool(awaiting),
            stale_message=self.stale_message,
            **kwargs,
        )

    def perform(self, form):
        data = form.cleaned_data
        approval = approval_decide(
            acting_user=self.request.user,
            job=self.job,
            institution=data["institution"],
            decision=data["decision"],
            spec_digest=data["spec_digest"],
            agreement_version_id=data["agreement_version_id"],
            reason=data["reason"],
        )
        verb = "approved" if approval.decision == Approval.Decision.APPROVED else "rejected"
        messages.success(
            self.request,
            f"{approval.institution} {verb} job #{self.job.pk}. The decision is recorded "
            "in the ledger.",
        )
        return redirect(job_detail_url(self.job))

    def form_valid(self, form):
        try:
            return self.perform(form)
        except ConflictError as exc:
            self.reload_job()
            if exc.code == "stale":
                # Ask again against the current spec: a fresh form with the new
                # digest, the reason kept (nothing typed is lost), the choice not.
                self.stale_message = (
                    "This job or the agreement changed since you opened it — here is the "
                    "current version, please review again."
                )
                fresh = self._decision_form(
                    initial={**self.get_initial(), "reason": form.cleaned_data.get("reason", "")}
                )
                return self.render_to_response(self.get_context_data(form=fresh))
            form.add_error(None, str(exc))
            return self.form_invalid(form)
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
