"""Pages for training jobs: the list, proposing and editing a job, its page, submitting a
draft and cancelling.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.shortcuts import redirect

from audit.ledger.selectors import entries_about
from consortium.core.errors import ServiceError
from consortium.core.pages import apply_service_errors, error_message
from consortium.governance.pages import GovernanceAction, GovernanceForm, GovernancePage
from training.jobs import selectors
from training.jobs.central_validation import uploaded_summary
from training.jobs.compliance import ComplianceError
from training.jobs.describe import describe_contribution, describe_evaluation, describe_pipeline
from training.jobs.proposals import (
    job_cancel,
    job_create_draft,
    job_propose,
    job_submit,
    job_update_spec,
)
from training.jobs.spec import shared_fraction
from training.models import JobState, PrivacyReservation, SiteDataset, TrainingJob
from training.rounds.waiting import job_page_state
from training.web.forms import CancelForm, JobForm
from training.web.presenters import (
    field_for_spec_path,
    filter_help,
    job_spec_json,
    percent,
    spec_rows,
    split_spec_error,
)
from training.web.views.mixins import JobMixin, job_detail_url

JOBS_PER_PAGE = 25
EDITABLE_STATES = (JobState.DRAFT, JobState.AWAITING_APPROVAL)


def _compliance_message(exc: ComplianceError) -> str:
    return "This job breaks the agreement in force: " + " ".join(
        f"[{p.term}{' · ' + p.institution if p.institution else ''}] {p.message}"
        for p in exc.problems
    )


class JobListView(GovernancePage):
    """The consortium's jobs, newest first, in a fixed number of queries."""

    permission_required = "consortium.view_consortium"
    template_name = "training/job_list.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        jobs = selectors.jobs_for_list(self.request.user).filter(consortium=self.consortium)
        state = self.request.GET.get("state", "")
        if state in JobState.values:
            jobs = jobs.filter(state=state)
        else:
            state = ""
        page = Paginator(jobs, JOBS_PER_PAGE).get_page(self.request.GET.get("page"))
        return super().get_context_data(
            page_obj=page,
            jobs=page.object_list,
            state=state,
            states=JobState.choices,
            can_propose=self.can("training.propose_job", self.consortium),
            **kwargs,
        )


def apply_job_errors(form, exc: ValidationError) -> list[str]:
    """Put a service's ValidationError on the job form.

    The spec's errors come as ``"path: message"`` strings under ``"spec"``: each
    goes next to its field where one matches (``optimizer.lr`` -> learning
    rate), and all of them are returned for the summary at the top.
    """
    summary: list[str] = []
    if not hasattr(exc, "error_dict"):
        form.add_error(None, exc)
        return summary
    for key, errors in exc.error_dict.items():
        for error in errors:
            for text in error.messages:
                if key != "spec":
                    summary.append(text)
                    form.add_error(key if key in form.fields else None, text)
                    continue
                summary.append(text)
                path, message = split_spec_error(text)
                field = field_for_spec_path(path)
                if field in form.fields:
                    form.add_error(field, f"{path}: {message}" if "." in path else message)
    return summary


class JobFormMixin:
    """Shared by propose and edit: the form's choices, its help, and the way
    service errors come back on it."""

    template_name = "training/job_form.html"
    form_class = JobForm
    spec_errors: list[str] = []
    compliance: ComplianceError | None = None

    def get_form_kwargs(self):
        kwargs = super().get_form_kwargs()
        kwargs["institutions"] = self.consortium.institutions.order_by("name")
        kwargs["dataset_keys"] = list(
            SiteDataset.objects.filter(institution__consortium=self.consortium)
            .order_by("key")
            .values_list("key", flat=True)
            .distinct()
        )
        return kwargs

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            filter_help=filter_help(),
            spec_errors=self.spec_errors,
            compliance=self.compliance,
            **kwargs,
        )

    def form_valid(self, form):
        try:
            return self.perform(form)
        except ComplianceError as exc:
            self.compliance = exc
            return self.form_invalid(form)
        except ValidationError as exc:
            self.spec_errors = apply_job_errors(form, exc)
            return self.form_invalid(form)
        except ServiceError as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)


class JobCreateView(JobFormMixin, GovernanceForm):
    permission_required = "training.propose_job"

    def get_permission_object(self):
        return self.consortium

    def get_initial(self):
        return JobForm.initial_default()

    def perform(self, form):
        title = form.cleaned_data["title"]
        if self.request.POST.get("action") == "draft":
            job = job_create_draft(
                acting_user=self.request.user,
                consortium=self.consortium,
                title=title,
                spec=form.to_spec(),
            )
            messages.success(
                self.request,
                f"Job #{job.pk} was saved as a draft. Nothing is reserved or asked until "
                "you submit it for approval.",
            )
        else:
            job = job_propose(
                acting_user=self.request.user,
                consortium=self.consortium,
                title=title,
                spec=form.to_spec(),
            )
            messages.success(
                self.request,
                f"Job #{job.pk} was proposed: the approvers of every participating "
                "institution were asked to decide.",
            )
        return redirect(job_detail_url(job))


class JobEditView(JobMixin, JobFormMixin, GovernanceForm):
    permission_required = "training.change_job"

    def get_initial(self):
        return JobForm.initial_from(self.job)

    def get_context_data(self, **kwargs):
        job = self.job
        return super().get_context_data(
            editing=True,
            editable=job.state in EDITABLE_STATES,
            decisions_given=len(selectors.current_decisions(job)),
            **kwargs,
        )

    def perform(self, form):
        job = job_update_spec(
            acting_user=self.request.user,
            job=self.job,
            spec=form.to_spec(),
            title=form.cleaned_data["title"],
        )
        if job.state == JobState.AWAITING_APPROVAL:
            text = (
                f"Job #{job.pk} was changed: every approver is asked to review it again "
                "(decisions given before no longer count)."
            )
        else:
            text = f"Draft job #{job.pk} was saved."
        messages.success(self.request, text)
        return redirect(job_detail_url(job))


class JobDetailView(JobMixin, GovernancePage):
    permission_required = "training.view_job"
    template_name = "training/job_detail.html"

    def get_context_data(self, **kwargs):
        job = self.job
        spec = job.spec
        decisions = selectors.current_decisions(job)
        reserved = {
            r.institution_id: r
            for r in job.reservations.exclude(status=PrivacyReservation.Status.RELEASED)
        }
        participants = []
        for p in job.participants.all():
            current = decisions.get(p.institution_id)
            older = [
                a
                for a in sorted(job.approvals.all(), key=lambda a: a.decided_at, reverse=True)
                if a.institution_id == p.institution_id
                and a is not current
                and not selectors.is_valid_approval(a, job)
            ]
            participants.append(
                {
                    "participant": p,
                    "decision": current,
                    "superseded": older,
                    "reservation": reserved.get(p.institution_id),
                }
            )
        user = self.request.user
        accountability = selectors.job_accountability(job)
        return super().get_context_data(
            spec_rows=spec_rows(spec),
            pipeline=describe_pipeline(spec),
            shared_percent=percent(shared_fraction(spec)),
            spec_pretty=job_spec_json(job),
            participants=participants,
            contribution_text=describe_contribution(spec),
            evaluation_text=describe_evaluation(spec, uploaded=uploaded_summary(job)),
            accountability=accountability,
            live_state=job_page_state(job, account=accountability),
            ledger=entries_about(TrainingJob._meta.label_lower, str(job.pk)),
            can_edit=job.state in EDITABLE_STATES and user.has_perm("training.change_job", job),
            can_submit=job.state == JobState.DRAFT and user.has_perm("training.change_job", job),
            can_cancel=not job.is_terminal and user.has_perm("training.cancel_job", job),
            can_review=job.state == JobState.AWAITING_APPROVAL
            and user.has_perm("training.decide_job", job),
            **kwargs,
        )


class JobSubmitView(JobMixin, GovernanceAction):
    permission_required = "training.change_job"

    def post(self, request, *args, **kwargs):
        try:
            job = job_submit(acting_user=request.user, job=self.job)
        except ComplianceError as exc:
            messages.error(request, _compliance_message(exc))
        except (ValidationError, ServiceError) as exc:
            messages.error(request, error_message(exc))
        else:
            messages.success(
                request,
                f"Job #{job.pk} was submitted: the approvers of every participating "
                "institution were asked to decide.",
            )
        return redirect(job_detail_url(self.job))


class JobCancelView(JobMixin, GovernanceForm):
    permission_required = "training.cancel_job"
    template_name = "training/job_cancel.html"
    form_class = CancelForm

    def perform(self, form):
        job = job_cancel(
            acting_user=self.request.user, job=self.job, reason=form.cleaned_data["reason"]
        )
        messages.success(self.request, f"Job #{job.pk} was cancelled; its budget is released.")
        return redirect(job_detail_url(job))
