"""The error responses the training endpoints document: not found (or not allowed), invalid
input, a conflict with the current state, and a job refused by the compliance check with
the problems it found.
"""

from __future__ import annotations

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from consortium.core.api.schema import ErrorSerializer

NOT_FOUND = OpenApiResponse(ErrorSerializer, description="Not found or not allowed.")
INVALID = OpenApiResponse(
    ErrorSerializer, description="Invalid input: `{field: [messages]}` or `{detail, code}`."
)
CONFLICT = OpenApiResponse(ErrorSerializer, description="Conflicts with the current state.")


class ProblemSerializer(serializers.Serializer):
    """One way a job breaks the agreement (``training.jobs.compliance.Problem``)."""

    term = serializers.CharField(
        help_text="agreement, participants, withdrawn, signature, purpose, model_family, "
        "shared_fraction, dp_mechanism, dataset, central_validation_set or budget."
    )
    institution = serializers.CharField(
        allow_blank=True, help_text="The institution's slug, or empty for the whole job."
    )
    message = serializers.CharField()


class ComplianceErrorSerializer(ErrorSerializer):
    """A refused job: ``code`` is ``not_compliant`` and ``problems`` names each
    term and institution (other conflicts have no ``problems``)."""

    problems = ProblemSerializer(many=True, required=False)


NOT_COMPLIANT = OpenApiResponse(
    ComplianceErrorSerializer,
    description="The job breaks the agreement or a budget (`code` not_compliant, with "
    "`problems`), or conflicts with the job's state.",
)
SPEC_INVALID = OpenApiResponse(
    description='Invalid input: `{field: [messages]}`; a malformed spec gives `{"spec": '
    '["path: message", ...]}`.'
)
