"""Query filters for the API's lists (django-filter). They narrow a queryset that
is already scoped to what the user may see; they never widen it."""

from __future__ import annotations

import django_filters

from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Institution,
    Invitation,
    Membership,
    Role,
)


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
    agreement = django_filters.NumberFilter(field_name="agreement_id", help_text="Agreement id.")
    status = django_filters.ChoiceFilter(choices=AgreementVersion.Status.choices)

    class Meta:
        model = AgreementVersion
        fields = ["agreement", "status"]
