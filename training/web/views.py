"""Pages for site data sets, training jobs, approvals, notifications and the
site workers' credentials.

Each view is thin, like the governance pages: it loads its object through a
selector scoped to the user (``consortium.core.pages`` checks the declared
permission and answers a forbidden object with the same 404 as a missing one),
validates a form, calls one service with ``acting_user=request.user``, shows a
message and redirects. A refused form is re-rendered with exactly what was typed.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.core.paginator import Paginator
from django.db.models import Prefetch
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.functional import cached_property
from django.views.generic import TemplateView

from audit.models import LedgerEntry
from consortium.core.errors import ConflictError, ServiceError
from consortium.core.pages import (
    SIGNED_IN,
    PermissionRequiredMixin,
    apply_service_errors,
    first_or_404,
)
from consortium.governance import selectors as governance
from consortium.governance.models import Role
from consortium.governance.pages import GovernanceAction, GovernanceForm, GovernancePage
from consortium.governance.permissions import grants_of
from training.jobs import selectors, services
from training.jobs.compliance import ComplianceError
from training.jobs.spec import describe_contribution, describe_pipeline, shared_fraction
from training.models import (
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    SiteCredential,
    SiteDataset,
    TrainingJob,
)
from training.rounds import sites
from training.rounds.live import job_live_state
from training.web.forms import CancelForm, DatasetForm, DecisionForm, JobForm
from training.web.presenters import (
    field_for_spec_path,
    filter_help,
    job_review,
    percent,
    spec_rows,
    split_spec_error,
)

JOBS_PER_PAGE = 25
INBOX_PER_PAGE = 25
NOTIFICATIONS_PER_PAGE = 50
EDITABLE_STATES = (JobState.DRAFT, JobState.AWAITING_APPROVAL)


def _message_of(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)


def _compliance_message(exc: ComplianceError) -> str:
    return "This job breaks the agreement in force: " + " ".join(
        f"[{p.term}{' · ' + p.institution if p.institution else ''}] {p.message}"
        for p in exc.problems
    )


# --- Site data sets ----------------------------------------------------------------------


class InstitutionScopedMixin:
    @cached_property
    def institution(self):
        return first_or_404(
            governance.institutions_visible_to(self.request.user),
            consortium=self.consortium,
            slug=self.kwargs["inst_slug"],
        )

    def get_permission_object(self):
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("institution", self.institution)
        return super().get_context_data(**kwargs)


class DatasetMixin(InstitutionScopedMixin):
    @cached_property
    def dataset(self):
        return first_or_404(
            selectors.datasets_visible_to(self.request.user),
            institution=self.institution,
            key=self.kwargs["key"],
        )

    def get_permission_object(self):
        # A missing key is the same 404 as a forbidden institution.
        self.dataset  # noqa: B018
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("dataset", self.dataset)
        return super().get_context_data(**kwargs)


def _dataset_list_url(view) -> str:
    return reverse("training:dataset-list", args=[view.consortium.slug, view.institution.slug])


class DatasetListView(InstitutionScopedMixin, GovernancePage):
    permission_required = "training.view_datasets"
    template_name = "training/dataset_list.html"

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            datasets=selectors.datasets_visible_to(self.request.user).filter(
                institution=self.institution
            ),
            can_manage=self.can("training.manage_datasets", self.institution),
            **kwargs,
        )


class DatasetCreateView(InstitutionScopedMixin, GovernanceForm):
    permission_required = "training.manage_datasets"
    template_name = "training/dataset_form.html"
    form_class = DatasetForm

    def form_valid(self, form):
        try:
            dataset = services.dataset_register(
                acting_user=self.request.user,
                institution=self.institution,
                **form.service_fields(),
            )
        except ConflictError as exc:  # the key is taken at this institution
            form.add_error("key", str(exc))
            return self.form_invalid(form)
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        messages.success(
            self.request,
            f"{self.institution} now offers the data set '{dataset.key}' "
            f"({dataset.num_records} records). Only its description is stored here.",
        )
        return redirect(_dataset_list_url(self))


class DatasetEditView(DatasetMixin, GovernanceForm):
    permission_required = "training.manage_datasets"
    template_name = "training/dataset_form.html"
    form_class = DatasetForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "editing": True}

    def get_initial(self):
        return DatasetForm.initial_from(self.dataset)

    def perform(self, form):
        services.dataset_update(
            acting_user=self.request.user, dataset=self.dataset, **form.service_fields()
        )
        messages.success(self.request, f"The data set '{self.dataset.key}' was updated.")
        return redirect(_dataset_list_url(self))


class DatasetRemoveView(DatasetMixin, GovernancePage):
    """GET asks for confirmation; POST removes the offer."""

    permission_required = "training.manage_datasets"
    template_name = "training/dataset_remove.html"

    def post(self, request, *args, **kwargs):
        try:
            services.dataset_remove(acting_user=request.user, dataset=self.dataset)
        except ServiceError as exc:
            return self.render_to_response(self.get_context_data(error=str(exc)))
        messages.success(
            request, f"{self.institution} no longer offers the data set '{self.dataset.key}'."
        )
        return redirect(_dataset_list_url(self))


# --- Jobs: list, propose, edit -------------------------------------------------------------


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


def _job_url(job) -> str:
    return reverse("training:job-detail", args=[job.consortium.slug, job.pk])


class JobCreateView(JobFormMixin, GovernanceForm):
    permission_required = "training.propose_job"

    def get_permission_object(self):
        return self.consortium

    def get_initial(self):
        return JobForm.initial_default()

    def perform(self, form):
        title = form.cleaned_data["title"]
        if self.request.POST.get("action") == "draft":
            job = services.job_create_draft(
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
            job = services.job_propose(
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
        return redirect(_job_url(job))


class JobMixin:
    """Loads ``self.job`` inside the URL's consortium, with what its pages show."""

    @cached_property
    def job(self):
        return first_or_404(
            selectors.jobs_visible_to(self.request.user).prefetch_related(
                Prefetch(
                    "participants",
                    queryset=JobParticipant.objects.select_related("institution"),
                ),
                Prefetch("approvals", queryset=Approval.objects.select_related("institution")),
            ),
            consortium=self.consortium,
            pk=self.kwargs["pk"],
        )

    def get_permission_object(self):
        return self.job

    def get_context_data(self, **kwargs):
        kwargs.setdefault("job", self.job)
        return super().get_context_data(**kwargs)

    def reload_job(self):
        self.__dict__.pop("job", None)
        return self.job


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
        job = services.job_update_spec(
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
        return redirect(_job_url(job))


# --- Jobs: detail and actions --------------------------------------------------------------


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
            spec_pretty=services.job_spec_json(job),
            participants=participants,
            contribution_text=describe_contribution(spec),
            accountability=accountability,
            live_state=job_live_state(job, account=accountability),
            ledger=LedgerEntry.objects.filter(
                subject_type=TrainingJob._meta.label_lower, subject_id=str(job.pk)
            ).order_by("seq"),
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
            job = services.job_submit(acting_user=request.user, job=self.job)
        except ComplianceError as exc:
            messages.error(request, _compliance_message(exc))
        except (ValidationError, ServiceError) as exc:
            messages.error(request, _message_of(exc))
        else:
            messages.success(
                request,
                f"Job #{job.pk} was submitted: the approvers of every participating "
                "institution were asked to decide.",
            )
        return redirect(_job_url(self.job))


class JobCancelView(JobMixin, GovernanceForm):
    permission_required = "training.cancel_job"
    template_name = "training/job_cancel.html"
    form_class = CancelForm

    def perform(self, form):
        job = services.job_cancel(
            acting_user=self.request.user, job=self.job, reason=form.cleaned_data["reason"]
        )
        messages.success(self.request, f"Job #{job.pk} was cancelled; its budget is released.")
        return redirect(_job_url(job))


# --- Approvals --------------------------------------------------------------------------


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


class JobReviewView(JobMixin, GovernanceForm):
    """What the job will do with the approver's data, in plain words, and the
    decision form. The form carries the digest and agreement version that were
    shown: if either changed before the decision arrives, the decision is
    refused as stale and the current job is shown instead."""

    permission_required = "training.decide_job"
    template_name = "training/job_review.html"
    form_class = DecisionForm
    stale_message = ""

    def approver_institutions(self):
        """The user's institutions that take part (actively) in the job."""
        mine = governance.user_institutions_with_role(
            self.request.user, self.consortium, Role.APPROVER
        )
        active = {p.institution_id for p in selectors.active_participants(self.job)}
        return mine.filter(pk__in=active)

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
        return super().get_context_data(
            review=job_review(job, institutions, decisions),
            contribution_text=describe_contribution(job.spec),
            awaiting=awaiting,
            open_for_decision=job.state == JobState.AWAITING_APPROVAL and bool(awaiting),
            stale_message=self.stale_message,
            **kwargs,
        )

    def perform(self, form):
        data = form.cleaned_data
        approval = services.approval_decide(
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
        return redirect(_job_url(self.job))

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


# --- Notifications ---------------------------------------------------------------------


class NotificationListView(PermissionRequiredMixin, TemplateView):
    """The signed-in user's notifications, newest first; POST marks them all read."""

    permission_required = SIGNED_IN
    template_name = "training/notification_list.html"

    def get_context_data(self, **kwargs):
        notifications = selectors.notifications_of(self.request.user).select_related("consortium")
        page = Paginator(notifications, NOTIFICATIONS_PER_PAGE).get_page(
            self.request.GET.get("page")
        )
        return super().get_context_data(page_obj=page, notifications=page.object_list, **kwargs)

    def post(self, request, *args, **kwargs):
        count = services.notification_mark_read(user=request.user)
        messages.success(
            request, f"{count} notification{'s' if count != 1 else ''} marked as read."
        )
        return redirect("training:notification-list")


# --- Site worker credentials ------------------------------------------------------------


class SiteCredentialForm(forms.Form):
    """A new worker credential: a label, and the worker's public key (PEM)."""

    label = forms.CharField(
        max_length=100,
        help_text="A name to tell this worker apart, e.g. 'gpu-node-1'.",
    )
    public_key = forms.CharField(
        label="Worker public key (PEM)",
        required=False,
        widget=forms.Textarea(
            attrs={
                "rows": 5,
                "class": "mono",
                "placeholder": "-----BEGIN PUBLIC KEY-----\n…\n-----END PUBLIC KEY-----",
            }
        ),
        help_text="The Ed25519 public key of the worker's signing key. Generate the pair on "
        "the site machine with generate_keypair() (training.fl.signing): the private key "
        "stays there (SITE_SIGNING_KEY), the public key goes here. Leave empty to use the "
        "worker key registered on the institution.",
    )


class SiteCredentialListView(InstitutionScopedMixin, GovernanceForm):
    """The site's worker credentials, and the form that creates one. The token is
    shown in the response to the POST that created it, and never again: it is
    not stored (only its hash is), so a reload of the list cannot show it."""

    permission_required = "training.manage_site_credentials"
    template_name = "training/credential_list.html"
    form_class = SiteCredentialForm

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            credentials=SiteCredential.objects.filter(institution=self.institution)
            .select_related("created_by", "revoked_by")
            .order_by("-created_at", "-pk"),
            has_institution_key=bool(self.institution.worker_public_key),
            **kwargs,
        )

    def perform(self, form):
        credential, token = sites.site_credential_create(
            acting_user=self.request.user,
            institution=self.institution,
            label=form.cleaned_data["label"],
            public_key=form.cleaned_data["public_key"],
        )
        response = self.response_class(
            request=self.request,
            template=["training/credential_created.html"],
            context=self.get_context_data(
                credential=credential,
                token=token,
                central_url=settings.SITE_URL,
            ),
        )
        response["Cache-Control"] = "no-store"
        return response


class SiteCredentialRevokeView(InstitutionScopedMixin, GovernancePage):
    """GET asks for confirmation; POST revokes the credential."""

    permission_required = "training.manage_site_credentials"
    template_name = "training/credential_revoke.html"

    @cached_property
    def credential(self):
        return first_or_404(
            SiteCredential.objects.filter(institution=self.institution), pk=self.kwargs["pk"]
        )

    def get_permission_object(self):
        # A credential of another institution is the same 404 as a forbidden one.
        self.credential  # noqa: B018
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("credential", self.credential)
        return super().get_context_data(**kwargs)

    def post(self, request, *args, **kwargs):
        try:
            sites.site_credential_revoke(acting_user=request.user, credential=self.credential)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(
                request,
                f"The credential '{self.credential.label}' ({self.credential.token_prefix}…) "
                "is revoked: its worker's requests and uploads are refused from now on.",
            )
        return redirect(
            reverse("training:credential-list", args=[self.consortium.slug, self.institution.slug])
        )
