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
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import exceptions, mixins, serializers, status
from rest_framework.decorators import action
from rest_framework.response import Response

from audit.ledger.chain import verify_chain
from audit.ledger.checkpoint import checkpoint_to_json
from audit.ledger.checkpoints import (
    LedgerRewritten,
    checkpoint_publish,
    checkpoint_witnesses,
    inclusion_proof,
    signed_checkpoint_of,
)
from audit.ledger.merkle import ProofError, proof_to_hex
from audit.ledger.selectors import entries_of_consortia
from audit.models import LedgerEntry
from consortium.core.access import may
from consortium.core.api.filtering import UtcIsoDateTimeFilter
from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.core.api.schema import ErrorSerializer
from consortium.core.converters import MAX_ID
from consortium.governance import selectors
from consortium.governance.api.serializers import consortium_field
from training.rounds.site_api_ledger import CheckpointSerializer


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
    after = UtcIsoDateTimeFilter(
        field_name="created_at", lookup_expr="gte", help_text="Entries at or after (ISO 8601)."
    )
    before = UtcIsoDateTimeFilter(
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


class CheckpointWitnessSerializer(serializers.Serializer):
    site = serializers.SlugField(help_text="The institution whose worker cosigned.")
    witnessed_at = serializers.DateTimeField()
    signature_line = serializers.CharField(
        help_text="Its signed-note line over the checkpoint's text (under the site's slug)."
    )


class WitnessedCheckpointSerializer(serializers.Serializer):
    checkpoint = CheckpointSerializer()
    witnesses = CheckpointWitnessSerializer(many=True)


class InclusionProofSerializer(serializers.Serializer):
    seq = serializers.IntegerField()
    leaf_index = serializers.IntegerField(help_text="seq - 1: the entry's leaf in the tree.")
    entry_hash = serializers.CharField(help_text="The leaf: the entry's hash.")
    tree_size = serializers.IntegerField()
    root_hash = serializers.CharField(help_text="The tree's root at tree_size (hex).")
    inclusion_proof = serializers.ListField(
        child=serializers.CharField(), help_text="RFC 9162 audit path, leaf up, hex hashes."
    )


def _whole_number(request, name: str, default: int | None = None) -> int:
    """A query parameter that must be a whole number; a 400 saying so otherwise."""
    raw = request.query_params.get(name)
    if raw is None and default is not None:
        return default
    if raw is None or not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) > MAX_ID:
        raise exceptions.ValidationError(
            {name: [f"a whole number from 0 to {MAX_ID} is required, got {raw!r}"]}
        )
    return int(raw)


_LEDGER_REWRITTEN = OpenApiResponse(
    ErrorSerializer,
    description="The ledger contradicts a checkpoint the centre signed (ledger_rewritten).",
)


@extend_schema_view(list=extend_schema(summary="Ledger entries of the consortia you audit"))
class LedgerEntryViewSet(mixins.ListModelMixin, GovernanceViewSet):
    queryset = LedgerEntry.objects.all()
    serializer_class = LedgerEntrySerializer
    filterset_class = LedgerEntryFilter
    permission_map = {
        # Scoped to consortia where the user holds audit.view_ledger.
        "list": VISIBLE,
        "verify": "audit.verify_ledger",
        # Anyone who may read some consortium's ledger (checked in the actions).
        "checkpoint": VISIBLE,
        "inclusion": VISIBLE,
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
            400: OpenApiResponse(ErrorSerializer, description="No consortium named."),
            404: OpenApiResponse(
                ErrorSerializer, description="No such consortium, or not one you may verify."
            ),
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

    def _require_ledger_reader(self) -> None:
        # The tree is global like the chain; its head reveals no entry, but it is the
        # ledger's, so only those who may read some consortium's ledger see it (the same 404
        # as for anything one may not see).
        if not ledger_consortium_slugs(self.request.user):
            raise exceptions.NotFound()

    @extend_schema(
        summary="The ledger's newest signed checkpoint and the sites that witnessed it",
        description=(
            "The checkpoint of the ledger's Merkle tree head, signed by the centre (a new one "
            "is signed if the ledger grew), with the sites' cosignatures. Save its `note` and "
            "check it later with `manage.py verify_ledger --checkpoint FILE`."
        ),
        responses={
            200: WitnessedCheckpointSerializer,
            404: OpenApiResponse(ErrorSerializer, description="You may read no ledger."),
            409: _LEDGER_REWRITTEN,
        },
    )
    @action(detail=False, methods=["get"])
    def checkpoint(self, request):
        self._require_ledger_reader()
        try:
            row = checkpoint_publish()
        except LedgerRewritten as exc:
            return Response(
                {"detail": str(exc), "code": "ledger_rewritten"}, status=status.HTTP_409_CONFLICT
            )
        return Response(
            WitnessedCheckpointSerializer(
                {
                    "checkpoint": checkpoint_to_json(signed_checkpoint_of(row)),
                    "witnesses": checkpoint_witnesses(row),
                }
            ).data
        )

    @extend_schema(
        summary="Proof that one ledger entry is in the tree of a given size",
        parameters=[
            OpenApiParameter(
                "seq",
                {"type": "integer", "minimum": 1, "maximum": MAX_ID},
                required=True,
                description="The entry's number.",
            ),
            OpenApiParameter(
                "tree_size",
                {"type": "integer", "minimum": 0, "maximum": MAX_ID},
                description="The tree's size (0 or absent: today's ledger).",
            ),
        ],
        responses={
            200: InclusionProofSerializer,
            400: OpenApiResponse(ErrorSerializer, description="seq or tree_size is not valid."),
            404: OpenApiResponse(ErrorSerializer, description="No such entry that you may read."),
            409: OpenApiResponse(
                ErrorSerializer,
                description="No proof at that size (tree_size_unproven): the ledger has not "
                "reached tree_size yet, or the entry came after it.",
            ),
        },
    )
    @action(detail=False, methods=["get"], url_path="proof/inclusion")
    def inclusion(self, request):
        self._require_ledger_reader()
        seq = _whole_number(request, "seq")
        if not self.visible_queryset(request.user).filter(seq=seq).exists():
            raise exceptions.NotFound()
        tree_size = _whole_number(request, "tree_size", default=0) or None
        try:
            entry_hash, proof, size, root = inclusion_proof(seq, tree_size)
        except ProofError as exc:
            # A well-formed question today's ledger cannot answer (a size it has not reached):
            # the state, not the request, is what stands in the way.
            return Response({"detail": str(exc), "code": "tree_size_unproven"}, status=409)
        return Response(
            InclusionProofSerializer(
                {
                    "seq": seq,
                    "leaf_index": seq - 1,
                    "entry_hash": entry_hash,
                    "tree_size": size,
                    "root_hash": root.hex(),
                    "inclusion_proof": proof_to_hex(proof),
                }
            ).data
        )
