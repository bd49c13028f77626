"""Ledger endpoints of the REST API: read the entries of the consortia one audits
or administers, and recompute the whole chain.

Entries name their consortium by slug (they must outlive the rows they record),
so the scope is the slugs of the consortia where the user holds
``audit.view_ledger``.
"""

from __future__ import annotations

import json

import django_filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from audit.ledger.chain import verify_chain
from audit.ledger.selectors import entries_of_consortia
from audit.models import LedgerEntry
from consortium.core.access import may
from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.governance import selectors
from consortium.governance.api.serializers import ErrorSerializer, consortium_field


def ledger_consortium_slugs(user) -> list[str]:
    """Slugs of the consortia whose ledger entries ``user`` may read."""
    return [
        c.slug for c in selectors.consortia_visible_to(user) if may(user, "audit.view_ledger", c)
    ]


class LedgerEntryFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium_slug", help_text="The consortium's slug."
    )
    event = django_filters.CharFilter(field_name="event", help_text="e.g. agreement.signed")
    institution = django_filters.CharFilter(
        field_name="institution_slug", help_text="The institution's slug."
    )
    after = django_filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Entries at or after (ISO 8601)."
    )
    before = django_filters.IsoDateTimeFilter(
        field_name="created_at", lookup_expr="lt", help_text="Entries before (ISO 8601)."
    )

    class Meta:
        model = LedgerEntry
        fields = ["consortium", "event", "institution", "after", "before"]


class LedgerEntrySerializer(serializers.ModelSerializer):
    consortium = serializers.CharField(source="consortium_slug", read_only=True)
    payload = serializers.SerializerMethodField()

    class Meta:
        model = LedgerEntry
        fields = [
            "seq",
            "prev_hash",
            "entry_hash",
            "event",
            "actor_repr",
            "subject_type",
            "subject_id",
            "consortium",
            "institution_slug",
            "payload",
            "payload_text",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_payload(self, obj: LedgerEntry) -> dict:
        # payload_text is what the hash covers; the parsed form is a convenience.
        return json.loads(obj.payload_text)


class VerifyRequestSerializer(serializers.Serializer):
    consortium = consortium_field()


class VerificationSerializer(serializers.Serializer):
    ok = serializers.BooleanField()
    entry_count = serializers.IntegerField()
    head_hash = serializers.CharField()
    first_bad_seq = serializers.IntegerField(allow_null=True)
    reason = serializers.CharField(allow_blank=True)


@extend_schema_view(list=extend_schema(summary="Ledger entries of the consortia you audit"))
class LedgerEntryViewSet(mixins.ListModelMixin, GovernanceViewSet):
    queryset = LedgerEntry.objects.all()
    serializer_class = LedgerEntrySerializer
    filterset_class = LedgerEntryFilter
    permission_map = {
        # Scoped to consortia where the user holds audit.view_ledger.
        "list": VISIBLE,
        "verify": "audit.verify_ledger",
    }
    input_targets = {"verify": "consortium"}

    def visible_queryset(self, user):
        return entries_of_consortia(ledger_consortium_slugs(user))

    @extend_schema(
        summary="Recompute the whole hash chain",
        description=(
            "The chain is global (every consortium's entries are linked in one chain), "
            "so this checks all of it; the consortium names where you hold the right to verify."
        ),
        request=VerifyRequestSerializer,
        responses={
            200: VerificationSerializer,
            400: OpenApiResponse(description="Unknown consortium."),
            404: OpenApiResponse(ErrorSerializer, description="Not found or not allowed."),
        },
    )
    @action(detail=False, methods=["post"])
    def verify(self, request):
        self.validated_input(VerifyRequestSerializer)
        result = verify_chain()
        return Response(
            VerificationSerializer(
                {
                    "ok": result.ok,
                    "entry_count": result.entry_count,
                    "head_hash": result.head_hash,
                    "first_bad_seq": result.first_bad_seq,
                    "reason": result.reason,
                }
            ).data
        )
