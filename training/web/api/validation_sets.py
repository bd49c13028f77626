"""Endpoints for central validation sets: the sets the consortia you belong to hold (their
descriptions and digests, never the records), and a data steward's upload (multipart: the
institution, the data set key and the file; ``training.rounds.validation_sets``)."""

from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.parsers import MultiPartParser
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.governance.api.serializers import institution_field
from training.jobs.central_validation import validation_sets_visible_to
from training.models import CentralValidationSet
from training.rounds.validation_sets import MAX_UPLOAD_BYTES, validation_set_upload
from training.web.api.responses import CONFLICT, INVALID, NOT_FOUND


class ValidationSetFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )
    key = django_filters.CharFilter(field_name="key", help_text="The data set key.")
    current = django_filters.BooleanFilter(
        field_name="replaced_at",
        lookup_expr="isnull",
        help_text="true: only the sets not replaced by a newer upload.",
    )

    class Meta:
        model = CentralValidationSet
        fields = ["consortium", "key", "current"]


class ValidationSetSerializer(serializers.ModelSerializer):
    consortium = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    institution = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    agreement_version = serializers.IntegerField(source="agreement_version.number", read_only=True)
    input_shape = serializers.ListField(child=serializers.IntegerField(), read_only=True)

    class Meta:
        model = CentralValidationSet
        fields = [
            "id",
            "consortium",
            "key",
            "institution",
            "agreement_version",
            "file_name",
            "file_format",
            "upload_sha256",
            "digest",
            "num_records",
            "modality",
            "input_shape",
            "n_classes",
            "created_at",
            "replaced_at",
        ]
        read_only_fields = fields


class ValidationSetUploadSerializer(serializers.Serializer):
    institution = institution_field()
    key = serializers.CharField(max_length=64, help_text="The data set key it validates.")
    file = serializers.FileField(
        help_text="A .csv (header row, a 'label' column of class indices, numeric features) or "
        f"an .npz archive ('images' with 'labels' or 'masks'); at most {MAX_UPLOAD_BYTES} bytes."
    )

    def validate_file(self, value):
        if value.size > MAX_UPLOAD_BYTES:
            raise serializers.ValidationError(
                f"The file has {value.size} bytes; at most {MAX_UPLOAD_BYTES} are allowed."
            )
        return value


@extend_schema_view(
    list=extend_schema(summary="Central validation sets held by your consortia"),
)
class CentralValidationSetViewSet(mixins.ListModelMixin, GovernanceViewSet):
    """Validation sets the consortium holds on its server (uploaded by data stewards when the
    agreement allows a central validation set); jobs evaluated centrally are measured on them."""

    queryset = CentralValidationSet.objects.all()
    serializer_class = ValidationSetSerializer
    filterset_class = ValidationSetFilter
    parser_classes = [MultiPartParser]
    permission_map = {"list": VISIBLE, "create": "training.upload_validation_set"}
    input_targets = {"create": "institution"}

    def visible_queryset(self, user):
        return validation_sets_visible_to(user).order_by("consortium__slug", "key", "-created_at")

    @extend_schema(
        summary="Send a central validation set to the consortium's server (data stewards, when "
        "the agreement allows it; replaces the set held for the key)",
        request={"multipart/form-data": ValidationSetUploadSerializer},
        responses={201: ValidationSetSerializer, 400: INVALID, 404: NOT_FOUND, 409: CONFLICT},
    )
    def create(self, request):
        data = self.validated_input(ValidationSetUploadSerializer)
        uploaded = data["file"]
        held = validation_set_upload(
            acting_user=request.user,
            institution=data["institution"],
            key=data["key"],
            file_name=uploaded.name,
            data=uploaded.read(),
        )
        return Response(self.get_serializer(held).data, status=status.HTTP_201_CREATED)
