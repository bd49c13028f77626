"""REST API for site data sets, training jobs, approvals and notifications.

Built on the governance API's mechanisms (``consortium.core.api.permissions``): every
viewset derives from ``GovernanceViewSet`` and names each action's permission in
its ``permission_map`` (rules from ``training.jobs.permissions``); lookups go through
``training.jobs.selectors``' ``*_visible_to`` querysets, so a missing object and a
forbidden one give the same 404. Views validate with an input serializer, call
one service with ``acting_user=request.user`` and render with an output
serializer whose fields are named explicitly.

A job that breaks the agreement is refused with 409 and the problems the
compliance check found (``{"detail", "code": "not_compliant", "problems":
[{"term", "institution", "message"}]}``); a malformed spec is 400 with
``{"spec": ["path: message", ...]}``.
"""

from __future__ import annotations

import django_filters
from django.db.models import Prefetch
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.governance.api.serializers import (
    ErrorSerializer,
    consortium_field,
    institution_field,
)
from consortium.governance.models import Notification
from training.jobs import selectors, services
from training.models import (
    Approval,
    JobParticipant,
    JobState,
    Modality,
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)

_NOT_FOUND = OpenApiResponse(ErrorSerializer, description="Not found or not allowed.")
_INVALID = OpenApiResponse(description="Invalid input: `{field: [messages]}` or `{detail, code}`.")
_CONFLICT = OpenApiResponse(ErrorSerializer, description="Conflicts with the current state.")


# --- Errors --------------------------------------------------------------------------


class ProblemSerializer(serializers.Serializer):
    """One way a job breaks the agreement (``training.jobs.compliance.Problem``)."""

    term = serializers.CharField(
        help_text="agreement, participants, withdrawn, signature, purpose, model_family, "
        "shared_fraction, dp_mechanism, dataset or budget."
    )
    institution = serializers.CharField(
        allow_blank=True, help_text="The institution's slug, or empty for the whole job."
    )
    message = serializers.CharField()


class ComplianceErrorSerializer(ErrorSerializer):
    """A refused job: ``code`` is ``not_compliant`` and ``problems`` names each
    term and institution (other conflicts have no ``problems``)."""

    problems = ProblemSerializer(many=True, required=False)


_NOT_COMPLIANT = OpenApiResponse(
    ComplianceErrorSerializer,
    description="The job breaks the agreement or a budget (`code` not_compliant, with "
    "`problems`), or conflicts with the job's state.",
)
_SPEC_INVALID = OpenApiResponse(
    description='Invalid input: `{field: [messages]}`; a malformed spec gives `{"spec": '
    '["path: message", ...]}`.'
)


# --- Site data sets ---------------------------------------------------------------------


class DatasetFilter(django_filters.FilterSet):
    institution = django_filters.CharFilter(
        field_name="institution__slug", help_text="The institution's slug."
    )
    key = django_filters.CharFilter(field_name="key", help_text="The data set's key.")

    class Meta:
        model = SiteDataset
        fields = ["institution", "key"]


class DatasetSerializer(serializers.ModelSerializer):
    institution = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    input_shape = serializers.ListField(child=serializers.IntegerField(), read_only=True)
    schema = serializers.DictField(read_only=True)

    class Meta:
        model = SiteDataset
        fields = [
            "id",
            "institution",
            "key",
            "description",
            "modality",
            "num_records",
            "input_shape",
            "n_classes",
            "schema",
            "created_at",
            "updated_at",
        ]
        read_only_fields = fields


class DatasetUpdateSerializer(serializers.Serializer):
    """A data set's description; the service checks the values (the key is fixed)."""

    description = serializers.CharField(required=False)
    modality = serializers.ChoiceField(choices=Modality.choices, required=False)
    num_records = serializers.IntegerField(required=False)
    input_shape = serializers.ListField(
        child=serializers.IntegerField(),
        required=False,
        help_text="Shape of one input: [features] or [channels, height, width].",
    )
    n_classes = serializers.IntegerField(required=False)
    schema = serializers.DictField(
        required=False, help_text="Optional: column names, units, label meaning."
    )


class DatasetCreateSerializer(DatasetUpdateSerializer):
    institution = institution_field()
    key = serializers.CharField(
        max_length=64, help_text="The name the site's worker maps to its own files."
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("description", "modality", "num_records", "input_shape", "n_classes"):
            self.fields[name].required = True


@extend_schema_view(
    list=extend_schema(summary="Data sets offered by the institutions of your consortia"),
    retrieve=extend_schema(
        summary="One data set's description",
        responses={200: DatasetSerializer, 404: _NOT_FOUND},
    ),
)
class SiteDatasetViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    """Descriptions of the data sets each site offers; the records never leave the site."""

    queryset = SiteDataset.objects.all()
    serializer_class = DatasetSerializer
    filterset_class = DatasetFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "training.view_dataset",
        "create": "training.manage_datasets",
        "partial_update": "training.manage_datasets",
        "destroy": "training.manage_datasets",
    }
    input_targets = {"create": "institution"}

    def visible_queryset(self, user):
        return selectors.datasets_visible_to(user)

    @extend_schema(
        summary="Register a data set your site offers (data stewards; the records stay on site)",
        request=DatasetCreateSerializer,
        responses={201: DatasetSerializer, 400: _INVALID, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    def create(self, request):
        data = self.validated_input(DatasetCreateSerializer)
        dataset = services.dataset_register(acting_user=request.user, **data)
        return Response(self.get_serializer(dataset).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Change a data set's description (its key is fixed)",
        request=DatasetUpdateSerializer,
        responses={200: DatasetSerializer, 400: _INVALID, 404: _NOT_FOUND},
    )
    def partial_update(self, request, pk=None):
        dataset = self.get_object()
        data = self.validated_input(DatasetUpdateSerializer)
        dataset = services.dataset_update(acting_user=request.user, dataset=dataset, **data)
        return Response(self.get_serializer(dataset).data)

    @extend_schema(
        summary="Withdraw a data set (refused while an unfinished job uses it)",
        responses={204: None, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    def destroy(self, request, pk=None):
        services.dataset_remove(acting_user=request.user, dataset=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- Jobs: output -----------------------------------------------------------------------


class JobFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )
    state = django_filters.ChoiceFilter(choices=JobState.choices)

    class Meta:
        model = TrainingJob
        fields = ["consortium", "state"]


class ParticipantSummarySerializer(serializers.Serializer):
    institution = serializers.SlugField(source="institution.slug")
    status = serializers.ChoiceField(choices=JobParticipant.Status.choices)


class DecisionSummarySerializer(serializers.Serializer):
    decision = serializers.ChoiceField(choices=Approval.Decision.choices)
    reason = serializers.CharField(allow_blank=True)
    decided_by = serializers.CharField(source="decided_by_repr")
    decided_at = serializers.DateTimeField()


class ParticipantSerializer(serializers.Serializer):
    institution = serializers.SlugField(source="institution.slug")
    institution_name = serializers.CharField(source="institution.name")
    status = serializers.ChoiceField(choices=JobParticipant.Status.choices)
    removed_at = serializers.DateTimeField(allow_null=True)
    removed_reason = serializers.CharField(allow_blank=True)
    decision = DecisionSummarySerializer(
        allow_null=True,
        help_text="The institution's decision that still counts (same spec digest and "
        "agreement version), or null while it is awaited.",
    )


class ReservationSerializer(serializers.Serializer):
    institution = serializers.SlugField(source="institution.slug")
    epsilon = serializers.FloatField(help_text="This job's own ε at the agreement's δ.")
    delta = serializers.FloatField()
    status = serializers.ChoiceField(choices=PrivacyReservation.Status.choices)
    created_at = serializers.DateTimeField()
    released_at = serializers.DateTimeField(allow_null=True)


_JOB_FIELDS = [
    "id",
    "consortium",
    "title",
    "state",
    "spec_digest",
    "agreement_version",
    "agreement_version_number",
    "proposer_repr",
    "created_at",
    "proposed_at",
    "approval_deadline",
    "state_changed_at",
    "end_reason",
]


class JobListSerializer(serializers.ModelSerializer):
    """A row of the job list: only what ``selectors.jobs_for_list`` loads."""

    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    agreement_version = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)
    agreement_version_number = serializers.IntegerField(
        source="agreement_version.number", read_only=True, allow_null=True
    )
    participants = ParticipantSummarySerializer(many=True, read_only=True)

    class Meta:
        model = TrainingJob
        fields = [*_JOB_FIELDS, "participants"]
        read_only_fields = fields


class JobDetailSerializer(JobListSerializer):
    """A job as an approver reviews it: the spec, the agreement version it is
    bound to, each participant's current decision and the budgets reserved."""

    spec = serializers.SerializerMethodField()
    participants = serializers.SerializerMethodField()
    reservations = ReservationSerializer(many=True, read_only=True)

    class Meta(JobListSerializer.Meta):
        fields = [*_JOB_FIELDS, "spec", "participants", "reservations"]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_spec(self, job: TrainingJob) -> dict:
        return job.spec

    @extend_schema_field(ParticipantSerializer(many=True))
    def get_participants(self, job: TrainingJob) -> list[dict]:
        decisions = selectors.current_decisions(job)
        rows = [
            {
                "institution": p.institution,
                "status": p.status,
                "removed_at": p.removed_at,
                "removed_reason": p.removed_reason,
                "decision": decisions.get(p.institution_id),
            }
            for p in job.participants.all()
        ]
        return ParticipantSerializer(rows, many=True).data


class ApprovalSerializer(serializers.ModelSerializer):
    """One decision, kept as history. ``valid`` says whether it still counts:
    it is bound to the spec digest and agreement version it was made under."""

    job = serializers.PrimaryKeyRelatedField(read_only=True)
    institution = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    agreement_version = serializers.PrimaryKeyRelatedField(read_only=True)
    agreement_version_number = serializers.IntegerField(
        source="agreement_version.number", read_only=True
    )
    decided_by = serializers.CharField(source="decided_by_repr", read_only=True)
    valid = serializers.SerializerMethodField()

    class Meta:
        model = Approval
        fields = [
            "id",
            "job",
            "institution",
            "decision",
            "reason",
            "spec_digest",
            "agreement_version",
            "agreement_version_number",
            "decided_by",
            "decided_at",
            "valid",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.BOOL)
    def get_valid(self, approval: Approval) -> bool:
        return selectors.is_valid_approval(approval, self.context["job"])


class DecisionResultSerializer(ApprovalSerializer):
    """The decision just recorded, and the job's state after it."""

    job_state = serializers.SerializerMethodField()

    class Meta(ApprovalSerializer.Meta):
        fields = [*ApprovalSerializer.Meta.fields, "job_state"]
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=JobState.choices))
    def get_job_state(self, approval: Approval) -> str:
        return self.context["job"].state


# --- Jobs: input ------------------------------------------------------------------------

_SPEC_HELP = (
    "The training spec (see training/spec.py): purpose, participants, dataset_key, model, "
    "rounds, optimizer, privacy_pipeline..."
)


class JobCreateSerializer(serializers.Serializer):
    consortium = consortium_field()
    title = serializers.CharField(max_length=200)
    spec = serializers.DictField(help_text=_SPEC_HELP)
    draft = serializers.BooleanField(
        default=False,
        help_text="Save as a draft (no compliance check, nothing reserved) instead of proposing.",
    )


class JobUpdateSerializer(serializers.Serializer):
    title = serializers.CharField(max_length=200, required=False)
    spec = serializers.DictField(
        required=False, help_text="The whole new spec; a change voids the approvals given."
    )


class JobCancelSerializer(serializers.Serializer):
    reason = serializers.CharField(help_text="Why the job is cancelled; it is recorded.")


class DecideSerializer(serializers.Serializer):
    institution = institution_field()
    decision = serializers.ChoiceField(choices=Approval.Decision.choices)
    reason = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Required to reject (the proposer sees it).",
    )
    spec_digest = serializers.CharField(
        max_length=64, help_text="The spec_digest of the job you reviewed."
    )
    agreement_version = serializers.IntegerField(
        help_text="The id of the agreement version the job was bound to when you reviewed it."
    )


# --- Jobs: views ------------------------------------------------------------------------


@extend_schema_view(
    list=extend_schema(summary="Training jobs of your consortia"),
    retrieve=extend_schema(
        summary="One job: its spec, agreement version, decisions and reserved budgets",
        responses={200: JobDetailSerializer, 404: _NOT_FOUND},
    ),
)
class TrainingJobViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, GovernanceViewSet):
    """Training jobs: propose, change, submit, cancel, and each institution's decision."""

    queryset = TrainingJob.objects.all()
    serializer_class = JobDetailSerializer
    filterset_class = JobFilter
    permission_map = {
        "list": VISIBLE,
        "retrieve": "training.view_job",
        "create": "training.propose_job",
        "partial_update": "training.change_job",
        "submit": "training.change_job",
        "cancel": "training.cancel_job",
        "decide": "training.decide_job",
        "approvals": "training.view_job",
    }
    input_targets = {"create": "consortium"}

    def visible_queryset(self, user):
        if getattr(self, "action", None) == "list":
            return selectors.jobs_for_list(user)
        return selectors.jobs_visible_to(user).prefetch_related(
            Prefetch(
                "participants",
                queryset=JobParticipant.objects.select_related("institution").order_by(
                    "institution__name"
                ),
            ),
            "approvals",
            Prefetch(
                "reservations",
                queryset=PrivacyReservation.objects.select_related("institution").order_by(
                    "created_at", "pk"
                ),
            ),
        )

    def get_serializer_class(self):
        if self.action == "list":
            return JobListSerializer
        return JobDetailSerializer

    def _detail(self, job: TrainingJob, *, code=status.HTTP_200_OK) -> Response:
        """The job as it is now, read again through the scoped queryset."""
        fresh = self.visible_queryset(self.request.user).get(pk=job.pk)
        return Response(JobDetailSerializer(fresh).data, status=code)

    @extend_schema(
        summary="Propose a job (checked against the agreement and budgets) or save a draft",
        request=JobCreateSerializer,
        responses={
            201: JobDetailSerializer,
            400: _SPEC_INVALID,
            404: _NOT_FOUND,
            409: _NOT_COMPLIANT,
        },
    )
    def create(self, request):
        data = self.validated_input(JobCreateSerializer)
        service = services.job_create_draft if data["draft"] else services.job_propose
        job = service(
            acting_user=request.user,
            consortium=data["consortium"],
            title=data["title"],
            spec=data["spec"],
        )
        return self._detail(job, code=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Change a job's title or spec before it is approved (approvals are voided)",
        request=JobUpdateSerializer,
        responses={
            200: JobDetailSerializer,
            400: _SPEC_INVALID,
            404: _NOT_FOUND,
            409: _NOT_COMPLIANT,
        },
    )
    def partial_update(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(JobUpdateSerializer)
        job = services.job_update_spec(
            acting_user=request.user,
            job=job,
            spec=data.get("spec", job.spec),
            title=data.get("title"),
        )
        return self._detail(job)

    @extend_schema(
        summary="Submit a draft for approval (the same checks as proposing)",
        request=None,
        responses={200: JobDetailSerializer, 404: _NOT_FOUND, 409: _NOT_COMPLIANT},
    )
    @action(detail=True, methods=["post"])
    def submit(self, request, pk=None):
        job = services.job_submit(acting_user=request.user, job=self.get_object())
        return self._detail(job)

    @extend_schema(
        summary="Cancel a job (the reason is recorded; reserved budgets are released)",
        request=JobCancelSerializer,
        responses={200: JobDetailSerializer, 400: _INVALID, 404: _NOT_FOUND, 409: _CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(JobCancelSerializer)
        job = services.job_cancel(acting_user=request.user, job=job, reason=data["reason"])
        return self._detail(job)

    @extend_schema(
        summary="Approve or reject a job for your institution (approvers)",
        description=(
            "Send the spec_digest and agreement_version you reviewed: if the job or the "
            "agreement changed since, the decision is refused with 409 and code `stale`."
        ),
        request=DecideSerializer,
        responses={
            201: DecisionResultSerializer,
            400: _INVALID,
            404: _NOT_FOUND,
            409: _CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def decide(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(DecideSerializer)
        approval = services.approval_decide(
            acting_user=request.user,
            job=job,
            institution=data["institution"],
            decision=data["decision"],
            reason=data["reason"],
            spec_digest=data["spec_digest"],
            agreement_version_id=data["agreement_version"],
        )
        fresh = self.visible_queryset(request.user).get(pk=job.pk)
        return Response(
            DecisionResultSerializer(approval, context={"job": fresh}).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(
        summary="Every decision on this job, newest first, and whether each still counts",
        responses={200: ApprovalSerializer(many=True), 404: _NOT_FOUND},
        filters=False,
    )
    @action(detail=True, methods=["get"])
    def approvals(self, request, pk=None):
        job = self.get_object()
        history = job.approvals.select_related("institution", "agreement_version").order_by(
            "-decided_at", "-pk"
        )
        page = self.paginate_queryset(history)
        data = ApprovalSerializer(page, many=True, context={"job": job}).data
        return self.get_paginated_response(data)


# --- Approver's inbox -------------------------------------------------------------------


class InboxItemSerializer(serializers.Serializer):
    """A job waiting on one or more of your institutions."""

    job = serializers.IntegerField(source="job.pk")
    title = serializers.CharField(source="job.title")
    consortium = serializers.SlugField(source="job.consortium.slug")
    approval_deadline = serializers.DateTimeField(source="job.approval_deadline")
    spec_digest = serializers.CharField(source="job.spec_digest")
    agreement_version = serializers.IntegerField(source="job.agreement_version_id")
    institutions = serializers.SerializerMethodField(
        help_text="Slugs of your institutions whose decision is awaited."
    )

    @extend_schema_field(serializers.ListField(child=serializers.SlugField()))
    def get_institutions(self, item) -> list[str]:
        return [i.slug for i in item.institutions]


class ApprovalInboxViewSet(GovernanceViewSet):
    """What waits on the approvers of your institutions."""

    queryset = TrainingJob.objects.all()
    serializer_class = InboxItemSerializer
    # What waits on the user's own institutions: already scoped by the selector.
    permission_map = {"inbox": VISIBLE}

    def visible_queryset(self, user):
        return selectors.jobs_visible_to(user)

    @extend_schema(
        summary="Jobs waiting on a decision from your institutions",
        responses={200: InboxItemSerializer(many=True)},
        filters=False,
    )
    @action(detail=False, methods=["get"])
    def inbox(self, request):
        page = self.paginate_queryset(selectors.approver_inbox(request.user))
        return self.get_paginated_response(InboxItemSerializer(page, many=True).data)


# --- Notifications ----------------------------------------------------------------------


class NotificationSerializer(serializers.ModelSerializer):
    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = Notification
        fields = ["id", "consortium", "message", "url", "created_at", "read_at"]
        read_only_fields = fields


class MarkReadSerializer(serializers.Serializer):
    ids = serializers.ListField(
        child=serializers.IntegerField(),
        required=False,
        allow_null=True,
        default=None,
        help_text="The notifications to mark read; leave out to mark every one.",
    )


class MarkedSerializer(serializers.Serializer):
    marked = serializers.IntegerField(help_text="How many notifications were unread and now are.")


@extend_schema_view(list=extend_schema(summary="Your notifications, newest first"))
class NotificationViewSet(mixins.ListModelMixin, GovernanceViewSet):
    """Your own in-app notifications."""

    queryset = Notification.objects.all()
    serializer_class = NotificationSerializer
    # Scoped to the user's own notifications.
    permission_map = {"list": VISIBLE, "mark_read": VISIBLE}

    def visible_queryset(self, user):
        return selectors.notifications_of(user)

    @extend_schema(
        summary="Mark your notifications read (the ones named, or all)",
        request=MarkReadSerializer,
        responses={200: MarkedSerializer, 400: _INVALID},
    )
    @action(detail=False, methods=["post"], url_path="mark-read")
    def mark_read(self, request):
        data = self.validated_input(MarkReadSerializer)
        marked = services.notification_mark_read(user=request.user, notification_ids=data["ids"])
        return Response(MarkedSerializer({"marked": marked}).data)
