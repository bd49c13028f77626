"""Pages for training jobs: the list, proposing and editing a job, its page, submitting a
draft and cancelling.
"""

from __future__ import annotations

from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.http import Http404, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.cache import patch_cache_control
from django.utils.functional import cached_property
from django.utils.http import urlencode

from audit.ledger.selectors import entries_about
from consortium.core.access import may
from consortium.core.errors import ServiceError
from consortium.core.pages import NOT_FOUND, apply_service_errors, error_message
from consortium.governance.pages import GovernanceAction, GovernanceForm, GovernancePage
from consortium.governance.selectors import agreement_in_force
from training.jobs import selectors
from training.jobs.central_validation import uploaded_summary
from training.jobs.compliance import ComplianceError
from training.jobs.describe import describe_contribution, describe_evaluation, describe_pipeline
from training.jobs.proposal_guidance import proposal_budget_preview, proposal_defaults
from training.jobs.proposals import (
    job_cancel,
    job_create_draft,
    job_propose,
    job_submit,
    job_update_spec,
)
from training.jobs.spec import privacy_audit_settings, shared_fraction
from training.models import JobState, PrivacyReservation, SiteDataset, TrainingJob
from training.rounds.audit_pictures import audit_picture_png
from training.rounds.waiting import job_page_state
from training.web.audit_presenters import audit_picture_view, job_audit_statuses
from training.web.forms import CancelForm, JobForm, pipeline_step_schema
from training.web.job_compare import compare_jobs, compare_one
from training.web.job_list_forms import JobCompareForm, JobFilterForm
from training.web.presenters import (
    field_for_spec_path,
    filter_help,
    job_spec_json,
    percent,
    spec_rows,
    split_spec_error,
)
from training.web.views.job_model import job_page_sections
from training.web.views.mixins import JobMixin, job_detail_url

JOBS_PER_PAGE = 25
EDITABLE_STATES = (JobState.DRAFT, JobState.AWAITING_APPROVAL)


def _compliance_message(exc: ComplianceError) -> str:
    return "This job breaks the agreement in force: " + " ".join(
        f"[{p.term}{' · ' + p.institution if p.institution else ''}] {p.message}"
        for p in exc.problems
    )


class JobListView(GovernancePage):
    """The consortium's jobs, newest first, in a fixed number of queries; filtered by a
    participant institution and a state (GET parameters the pager carries along), with a box
    on each row to pick two jobs for the comparison page."""

    permission_required = "consortium.view_consortium"
    template_name = "training/job_list.html"

    def get_permission_object(self):
        return self.consortium

    def get_context_data(self, **kwargs):
        form = JobFilterForm(self.request.GET, user=self.request.user, consortium=self.consortium)
        filters = form.filters()
        jobs = selectors.jobs_listed(self.request.user, consortium=self.consortium, **filters)
        page = Paginator(jobs, JOBS_PER_PAGE).get_page(self.request.GET.get("page"))
        return super().get_context_data(
            page_obj=page,
            jobs=page.object_list,
            filter_form=form,
            filtered=any(filters.values()),
            filter_query=urlencode(form.query()),
            can_propose=self.can("training.propose_job", self.consortium),
            **kwargs,
        )


class JobCompareView(GovernancePage):
    """Two jobs of the consortium side by side (``?a=<id>&b=<id>``). Ticked boxes from the
    list (``?jobs=<id>&jobs=<id>``) are sent on to that address. ``?a=<id>`` alone (the job
    page's "Compare with another job") shows that job and the picker for the second. A job
    the user may not see is the same 404 as a missing one; bad or missing numbers get the
    picker back, with why."""

    permission_required = "consortium.view_consortium"
    template_name = "training/job_compare.html"

    def get_permission_object(self):
        return self.consortium

    def get(self, request, *args, **kwargs):
        query = request.GET
        ticked = query.getlist("jobs")
        if ticked and "a" not in query and "b" not in query:
            if len(ticked) == 2:
                # The older job first (A), whichever order the list showed them in.
                first, second = sorted(ticked, key=lambda v: (not v.isdigit(), len(v), v))
                address = reverse("training:job-compare", args=[self.consortium.slug])
                return redirect(f"{address}?{urlencode({'a': first, 'b': second})}")
            form = JobCompareForm(user=request.user, consortium=self.consortium)
            problem = f"Tick two jobs to compare: {_ticked_words(len(ticked))}."
            return self.render_to_response(
                self.get_context_data(form=form, problem=problem), status=400
            )
        form = JobCompareForm(query or None, user=request.user, consortium=self.consortium)
        if not form.is_bound:
            return self.render_to_response(self.get_context_data(form=form))
        if not form.is_valid():
            return self.render_to_response(self.get_context_data(form=form), status=400)
        ids = [form.cleaned_data["a"]]
        if not form.awaits_second:
            ids.append(form.cleaned_data["b"])
        found = selectors.jobs_to_compare(request.user, consortium=self.consortium, job_ids=ids)
        if any(
            pk not in found or not may(request.user, "training.view_job", found[pk]) for pk in ids
        ):
            raise Http404(NOT_FOUND)
        jobs = [found[pk] for pk in ids]
        comparison = compare_jobs(*jobs) if len(jobs) == 2 else compare_one(jobs[0])
        return self.render_to_response(
            self.get_context_data(form=form, comparison=comparison, chart=comparison.chart())
        )


def _ticked_words(count: int) -> str:
    return "1 job was ticked" if count == 1 else f"{count} jobs were ticked"


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


#: The submit button that checks the spec and shows its privacy budget instead of proposing.
CHECK_ACTION = "check"


class JobFormMixin:
    """Shared by propose and edit: the form's choices, its help, the agreement's terms beside
    it, the budget check, and the way service errors come back on it."""

    template_name = "training/job_form.html"
    form_class = JobForm
    spec_errors: list[str] = []
    compliance: ComplianceError | None = None
    #: The job whose reservation a budget check leaves out (the one being edited).
    budget_exclude_job_id: int | None = None

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

    @cached_property
    def agreement_status(self):
        return agreement_in_force(self.consortium)

    def budget_preview_url(self) -> str:
        raise NotImplementedError

    def initial_spec(self) -> dict | None:
        """The spec the page opens with, whose budget it shows at once (None: none yet)."""
        return None

    def get_context_data(self, **kwargs):
        status = self.agreement_status
        if self.request.method == "GET" and "budget" not in kwargs:
            spec = self.initial_spec()
            if spec and spec.get("participants"):
                kwargs["budget"] = proposal_budget_preview(
                    consortium=self.consortium,
                    spec=spec,
                    exclude_job_id=self.budget_exclude_job_id,
                )
        return super().get_context_data(
            filter_help=filter_help(),
            pipeline_schema=pipeline_step_schema(),
            spec_errors=self.spec_errors,
            compliance=self.compliance,
            terms_version=status.version if status else None,
            eligible_institutions=(
                [
                    s.institution
                    for s in status.signed
                    if s.institution_id in status.eligible_institution_ids
                ]
                if status
                else []
            ),
            budget_preview_url=self.budget_preview_url(),
            **kwargs,
        )

    def form_valid(self, form):
        if self.request.POST.get("action") == CHECK_ACTION:
            # Without JavaScript: the same page again, with what was typed and its budget.
            budget = proposal_budget_preview(
                consortium=self.consortium,
                spec=form.to_spec(),
                exclude_job_id=self.budget_exclude_job_id,
            )
            return self.render_to_response(self.get_context_data(form=form, budget=budget))
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

    @cached_property
    def defaults(self):
        return proposal_defaults(consortium=self.consortium)

    def get_initial(self):
        return JobForm.initial_proposal(self.defaults)

    def initial_spec(self):
        return self.defaults.spec

    def budget_preview_url(self) -> str:
        return reverse("training:job-create-budget", args=[self.consortium.slug])

    def get_context_data(self, **kwargs):
        if self.request.method == "GET":
            kwargs.setdefault("proposal_notes", self.defaults.notes)
        return super().get_context_data(**kwargs)

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

    @property
    def budget_exclude_job_id(self):
        return self.job.pk

    def get_initial(self):
        return JobForm.initial_from(self.job)

    def initial_spec(self):
        return self.job.spec

    def budget_preview_url(self) -> str:
        return reverse("training:job-edit-budget", args=[self.consortium.slug, self.job.pk])

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


class JobBudgetPreviewView(JobFormMixin, GovernanceForm):
    """The proposal form's values in, the privacy budget they would spend out: the table the
    form shows as the proposer types (htmx posts the form here on every change). It proposes
    and reserves nothing; the same check runs again when the job is proposed."""

    http_method_names = ["post"]
    permission_required = "training.propose_job"
    template_name = "training/_proposal_budget.html"

    def get_permission_object(self):
        return self.consortium

    def budget_preview_url(self) -> str:
        return self.request.path

    def form_valid(self, form):
        budget = proposal_budget_preview(
            consortium=self.consortium,
            spec=form.to_spec(),
            exclude_job_id=self.budget_exclude_job_id,
        )
        return self.render_to_response(self.get_context_data(form=form, budget=budget))


class JobEditBudgetPreviewView(JobMixin, JobBudgetPreviewView):
    """The budget check of the edit form: the job's own reservation is left out, as the
    service replaces it when the change is saved."""

    permission_required = "training.change_job"

    def get_permission_object(self):
        return self.job

    @property
    def budget_exclude_job_id(self):
        return self.job.pk


#: The job page's newest ledger entries shown (newest first); the older ones are folded below.
HISTORY_SHOWN = 5


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
        live_state = job_page_state(job, account=accountability, read_afresh=False)
        ledger = list(entries_about(TrainingJob._meta.label_lower, str(job.pk)).reverse())
        return super().get_context_data(
            **job_page_sections(job, user=user, state=live_state, account=accountability),
            spec_rows=spec_rows(spec),
            pipeline=describe_pipeline(spec),
            shared_percent=percent(shared_fraction(spec)),
            spec_pretty=job_spec_json(job),
            participants=participants,
            contribution_text=describe_contribution(spec),
            evaluation_text=describe_evaluation(spec, uploaded=uploaded_summary(job)),
            accountability=accountability,
            privacy_audits=job_audit_statuses(job) if privacy_audit_settings(spec) else None,
            audit_picture=audit_picture_view(job),
            live_state=live_state,
            ledger_recent=ledger[:HISTORY_SHOWN],
            ledger_earlier=ledger[HISTORY_SHOWN:],
            can_edit=job.state in EDITABLE_STATES and may(user, "training.change_job", job),
            can_submit=job.state == JobState.DRAFT and may(user, "training.change_job", job),
            can_cancel=not job.is_terminal and may(user, "training.cancel_job", job),
            can_review=selectors.institutions_awaiting_decision_from(user, job).exists(),
            **kwargs,
        )


class JobAuditPictureView(JobMixin, GovernancePage):
    """The privacy audit's picture for the job's current spec: a record of a bundled **public**
    data set and what the attack rebuilt from its update (``training.rounds.audit_pictures``).
    Whoever may see the job may see it; a site's records are never drawn, so none can be
    served. 404 while none is drawn (the pages say why)."""

    permission_required = "training.view_job"

    def get(self, request, *args, **kwargs):
        png = audit_picture_png(self.job)
        if png is None:
            raise Http404("No audit picture is drawn for this job's current spec.")
        response = HttpResponse(png, content_type="image/png")
        response["Content-Length"] = str(len(png))
        # Private: it is shown only to the consortium's members. The page's address carries
        # the spec digest, so a changed spec's picture is fetched afresh.
        patch_cache_control(response, private=True, max_age=3600)
        return response


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
