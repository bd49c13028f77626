"""Query filters for the API's lists (django-filter). They narrow a queryset that
is already scoped to what the user may see; they never widen it."""

from __future__ import annotations

import django_filters
from django import forms
from drf_spectacular.utils import extend_schema_field

from consortium.core.converters import MAX_ID
from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Institution,
    Invitation,
    Membership,
    Role,
)


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": MAX_ID})
class IdFilter(django_filters.NumberFilter):
    """An id: a whole number from 1 to what the database holds; anything else is a 400 that
    says so (``-1.6e46`` once reached the database as an overflowing integer, a 500)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


class InstitutionFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )

    class Meta:
        model = Institution
        fields = ["consortium"]


class MembershipFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )
    institution = django_filters.CharFilter(
        field_name="institution__slug", help_text="The institution's slug."
    )
    role = django_filters.ChoiceFilter(choices=Role.choices)

    class Meta:
        model = Membership
        fields = ["consortium", "institution", "role"]


class InvitationFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )
    institution = django_filters.CharFilter(
        field_name="institution__slug", help_text="The institution's slug."
    )

    class Meta:
        model = Invitation
        fields = ["consortium", "institution"]


class AgreementFilter(django_filters.FilterSet):
    consortium = django_filters.CharFilter(
        field_name="consortium__slug", help_text="The consortium's slug."
    )

    class Meta:
        model = Agreement
        fields = ["consortium"]


class AgreementVersionFilter(django_filters.FilterSet):
    agreement = IdFilter(field_name="agreement_id", help_text="Agreement id.")
    status = django_filters.ChoiceFilter(choices=AgreementVersion.Status.choices)

    class Meta:
        model = AgreementVersion
        fields = ["agreement", "status"]
