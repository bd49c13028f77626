"""Approvers' endpoints: the decisions on a job (each kept as history, with whether it still
counts) and the inbox of jobs waiting on the approver's institutions.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import serializers
from rest_framework.decorators import action

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.core.converters import MAX_ID
from consortium.governance.api.serializers import institution_field
from training.jobs import selectors
from training.models import Approval, JobState, TrainingJob


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
        min_value=1,
        max_value=MAX_ID,
        help_text="The id of the agreement version the job was bound to when you reviewed it.",
    )


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
