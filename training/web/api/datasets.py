"""Endpoints for the data sets a site offers: list, read, register, change, withdraw."""

from __future__ import annotations

import django_filters
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, serializers, status
from rest_framework.response import Response

from consortium.core.api.permissions import VISIBLE, GovernanceViewSet
from consortium.governance.api.serializers import institution_field
from training.jobs import selectors
from training.jobs.datasets import dataset_register, dataset_remove, dataset_update
from training.models import Modality, SiteDataset
from training.web.api.responses import CONFLICT, INVALID, NOT_FOUND


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


#: The largest count a data set's columns hold (PositiveIntegerField: PostgreSQL's integer).
_LARGEST_COUNT = 2**31 - 1


class DatasetUpdateSerializer(serializers.Serializer):
    """A data set's description; the service checks the values (the key is fixed)."""

    description = serializers.CharField(required=False)
    modality = serializers.ChoiceField(choices=Modality.choices, required=False)
    num_records = serializers.IntegerField(required=False, min_value=1, max_value=_LARGEST_COUNT)
    input_shape = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=_LARGEST_COUNT),
        required=False,
        min_length=1,
        max_length=3,
        help_text="Shape of one input: [features] (tabular) or [channels, height, width] "
        "(image, segmentation).",
    )
    n_classes = serializers.IntegerField(required=False, min_value=2, max_value=_LARGEST_COUNT)
    schema = serializers.DictField(
        required=False, help_text="Optional: column names, units, label meaning."
    )


class DatasetCreateSerializer(DatasetUpdateSerializer):
    institution = institution_field()
    key = serializers.RegexField(
        r"^[a-z0-9][a-z0-9_.-]{0,63}$",
        max_length=64,
        help_text="The name the site's worker maps to its own files: 1 to 64 lower-case "
        "letters, digits, '.', '_' or '-', starting with a letter or digit.",
    )

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("description", "modality", "num_records", "input_shape", "n_classes"):
            self.fields[name].required = True


@extend_schema_view(
    list=extend_schema(summary="Data sets offered by the institutions of your consortia"),
    retrieve=extend_schema(
        summary="One data set's description",
        responses={200: DatasetSerializer, 404: NOT_FOUND},
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
        responses={201: DatasetSerializer, 400: INVALID, 404: NOT_FOUND, 409: CONFLICT},
    )
    def create(self, request):
        data = self.validated_input(DatasetCreateSerializer)
        dataset = dataset_register(acting_user=request.user, **data)
        return Response(self.get_serializer(dataset).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Change a data set's description (its key is fixed)",
        request=DatasetUpdateSerializer,
        responses={200: DatasetSerializer, 400: INVALID, 404: NOT_FOUND},
    )
    def partial_update(self, request, pk=None):
        dataset = self.get_object()
        data = self.validated_input(DatasetUpdateSerializer)
        dataset = dataset_update(acting_user=request.user, dataset=dataset, **data)
        return Response(self.get_serializer(dataset).data)

    @extend_schema(
        summary="Withdraw a data set (refused while an unfinished job uses it)",
        responses={204: None, 404: NOT_FOUND, 409: CONFLICT},
    )
    def destroy(self, request, pk=None):
        dataset_remove(acting_user=request.user, dataset=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)
