"""The API's OpenAPI schema class: drf-spectacular's, plus the 403 an act answers when it needs a
second factor the request lacks (:mod:`consortium.core.second_factor`).

Declared here, once, from the viewsets' ``permission_map`` and the set of acts, rather than by
hand on each operation: an action that comes to need a second factor (or a new act in the set)
gets its 403 in the schema with no one remembering to add it.
"""

from __future__ import annotations

from collections.abc import Mapping

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from consortium.core.second_factor import ACTS_NEEDING_SECOND_FACTOR, SECOND_FACTOR_REQUIRED_CODE


class SecondFactorRequiredSerializer(serializers.Serializer):
    """The body of the 403 of an act that needs a second factor the request lacks."""

    detail = serializers.CharField(help_text="What to do: where to verify, which token works.")
    code = serializers.ChoiceField(choices=[SECOND_FACTOR_REQUIRED_CODE])


SECOND_FACTOR_REQUIRED = OpenApiResponse(
    SecondFactorRequiredSerializer,
    description="The act needs a second factor (TWO_FACTOR_REQUIRED): a browser session that "
    "verified one, or an API token created in such a session.",
)


class ConsortiumAutoSchema(AutoSchema):
    def _acts(self) -> set[str]:
        view = self.view
        rule = getattr(view, "permission_map", {}).get(getattr(view, "action", None))
        names = rule.values() if isinstance(rule, Mapping) else [rule]
        return {n for n in names if isinstance(n, str)}

    def _get_response_bodies(self, direction="response"):
        responses = super()._get_response_bodies(direction)
        if self._acts() & ACTS_NEEDING_SECOND_FACTOR and "403" not in responses:
            responses["403"] = self._get_response_for_code(
                SECOND_FACTOR_REQUIRED, "403", direction=direction
            )
        return responses
