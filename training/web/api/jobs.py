"""Endpoints for training jobs: list and read, propose (or save a draft), change, submit,
cancel, and each institution's decision.
"""

from __future__ import annotations

import django_filters
from django.db.models import Prefetch
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.governance.api.serializers import consortium_field
from training.jobs import selectors
from training.jobs.approvals import approval_decide
from training.jobs.proposals import (
    job_cancel,
    job_create_draft,
    job_propose,
    job_submit,
    job_update_spec,
)
from training.models import Approval, JobParticipant, JobState, PrivacyReservation, TrainingJob
from training.web.api.approvals import (
    ApprovalSerializer,
    DecideSerializer,
    DecisionResultSerializer,
)
from training.web.api.responses import CONFLICT, INVALID, NOT_COMPLIANT, NOT_FOUND, SPEC_INVALID


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


@extend_schema_view(
    list=extend_schema(summary="Training jobs of your consortia"),
    retrieve=extend_schema(
        summary="One job: its spec, agreement version, decisions and reserved budgets",
        responses={200: JobDetailSerializer, 404: NOT_FOUND},
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
            400: SPEC_INVALID,
            404: NOT_FOUND,
            409: NOT_COMPLIANT,
        },
    )
    def create(self, request):
        data = self.validated_input(JobCreateSerializer)
        service = job_create_draft if data["draft"] else job_propose
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
            400: SPEC_INVALID,
            404: NOT_FOUND,
            409: NOT_COMPLIANT,
        },
    )
    def partial_update(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(JobUpdateSerializer)
        job = job_update_spec(
            acting_user=request.user,
            job=job,
            spec=data.get("spec", job.spec),
            title=data.get("title"),
        )
        return self._detail(job)

    @extend_schema(
        summary="Submit a draft for approval (the same checks as proposing)",
        request=None,
        responses={200: JobDetailSerializer, 404: NOT_FOUND, 409: NOT_COMPLIANT},
    )
    @action(detail=True, methods=["post"])
    def submit(self, request, pk=None):
        job = job_submit(acting_user=request.user, job=self.get_object())
        return self._detail(job)

    @extend_schema(
        summary="Cancel a job (the reason is recorded; reserved budgets are released)",
        request=JobCancelSerializer,
        responses={200: JobDetailSerializer, 400: INVALID, 404: NOT_FOUND, 409: CONFLICT},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(JobCancelSerializer)
        job = job_cancel(acting_user=request.user, job=job, reason=data["reason"])
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
            400: INVALID,
            404: NOT_FOUND,
            409: CONFLICT,
        },
    )
    @action(detail=True, methods=["post"])
    def decide(self, request, pk=None):
        job = self.get_object()
        data = self.validated_input(DecideSerializer)
        approval = approval_decide(
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
        responses={200: ApprovalSerializer(many=True), 404: NOT_FOUND},
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
