"""The API's OpenAPI schema: drf-spectacular's, plus every error status the API can answer.

A client generated from the schema, or a fuzzer checking the API against it, must find every
status the server sends declared, with its body. The error statuses follow from the shape of an
operation, so they are declared here, once, rather than by hand on each view, where the next
view would forget one:

* **401** on every operation that needs a caller: no token, or one expired or revoked;
* **403** on every operation: an act the caller's roles do not allow (``ActionPermission``), a
  session's missing CSRF token, an act needing a second factor the request lacks (code
  ``second_factor_required``, :mod:`consortium.core.second_factor`; said in the description of
  the operations whose ``permission_map`` names such an act);
* **400** where the request carries input: query parameters, a body;
* **404** where something is looked up: an id or slug in the path, an object named in the
  body (a missing, an invisible and a forbidden object answer the same,
  :mod:`consortium.core.api.permissions`), a page past the end of a list;
* **409** on every act that changes state: the state it acts on changed (a stale version, an
  expired invitation, a job no longer waiting);
* **415** where the request has a body: one not in the content type the operation takes (JSON,
  unless it takes a file).

Every error has one shape (:class:`ErrorSerializer`, from
:mod:`consortium.core.api.exceptions`). An operation that declares a status itself keeps its
declaration.

The same hook says two things about input that drf-spectacular leaves out: text that must not
be blank needs a character that is not white space (DRF strips, then refuses the blank), and a
decimal sent as text needs a digit (spectacular's pattern lets ``""`` and ``"-"`` through).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers

from consortium.core.second_factor import ACTS_NEEDING_SECOND_FACTOR, SECOND_FACTOR_REQUIRED_CODE

ERROR_COMPONENT = "Error"
_UNSAFE_METHODS = {"post", "put", "patch", "delete"}


class ErrorSerializer(serializers.Serializer):
    """Every error the API answers: what went wrong, a code to branch on, and, for a request
    whose fields were refused, one entry per field listing what is wrong with it."""

    detail = serializers.CharField(required=False, help_text="What went wrong, in words.")
    code = serializers.CharField(
        required=False,
        help_text=f"A stable code: 'not_found', 'invalid', '{SECOND_FACTOR_REQUIRED_CODE}', "
        "the code of a refused act ...",
    )
    problems = serializers.ListField(
        child=serializers.DictField(),
        required=False,
        help_text="For a refused training job: each term or institution that stands in its way.",
    )


SECOND_FACTOR_REQUIRED = OpenApiResponse(
    ErrorSerializer,
    description="Not allowed to the caller's roles; or the act needs a second factor "
    f"(code '{SECOND_FACTOR_REQUIRED_CODE}', TWO_FACTOR_REQUIRED): a browser session that "
    "verified one, or an API token created in such a session.",
)

_DESCRIPTIONS = {
    "400": "The request is malformed: each refused field or parameter says what is wrong.",
    "401": "No valid credentials: a personal API token (Authorization: Bearer) or a session; "
    "the token may have expired or been revoked.",
    "403": "Not allowed: the caller's roles do not allow this, or a session sent no CSRF token.",
    "404": "Not found, or not visible to the caller (the two answer the same); or a page past "
    "the end of the list.",
    "409": "The state changed: what the request acts on is no longer in the state it needs.",
    "415": "The body is not of the content type the operation takes (JSON, unless it says).",
}


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


def _error_statuses(method: str, operation: Mapping[str, Any]) -> list[str]:
    """The error statuses an operation can answer, from its shape (see the module's text)."""
    parameters = operation.get("parameters", [])
    where = {p.get("in") for p in parameters}
    has_body = "requestBody" in operation
    statuses = ["403"]
    security = operation.get("security")
    if security is None or all(requirement for requirement in security):
        # Unless one of the ways in is "no credentials" ({}): then nobody is turned away 401.
        statuses.append("401")
    if has_body or "query" in where:
        statuses.append("400")
    paginated = any(p.get("name") == "page" and p.get("in") == "query" for p in parameters)
    if "path" in where or has_body or paginated:
        statuses.append("404")
    if method in _UNSAFE_METHODS:
        statuses.append("409")
    if has_body:
        statuses.append("415")
    return statuses


def declare_error_responses(result, generator, request, public):
    """drf-spectacular postprocessing hook: the error statuses of every operation, with the
    one error body, where the operation does not declare them itself."""
    schemas = result.setdefault("components", {}).setdefault("schemas", {})
    # Replaces the serializer's rendering (the views that declare an error name the serializer):
    # the same fields, and the field errors beside them.
    schemas[ERROR_COMPONENT] = _error_component()
    _tighten_decimal_patterns(schemas)
    for name, component in schemas.items():
        if name.endswith("Request"):  # the request halves (COMPONENT_SPLIT_REQUEST)
            for field in component.get("properties", {}).values():
                _require_a_character(field)
    reference = {"$ref": f"#/components/schemas/{ERROR_COMPONENT}"}
    for path_item in result.get("paths", {}).values():
        for method, operation in path_item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            for parameter in operation.get("parameters", []):
                schema = parameter.get("schema", {})
                if parameter.get("in") == "query" and schema.get("type") == "string":
                    # Given, a parameter has a value (consortium.core.api.filtering).
                    schema.setdefault("minLength", 1)
                    _require_a_character(schema)
            responses = operation["responses"]
            for status, response in responses.items():
                if status.startswith(("4", "5")) and "content" not in response:
                    # Declared with words only: the body is still the one error shape.
                    response["content"] = {"application/json": {"schema": reference}}
            for status in _error_statuses(method, operation):
                if status in responses:
                    continue
                responses[status] = {
                    "content": {"application/json": {"schema": reference}},
                    "description": _DESCRIPTIONS[status],
                }
    return result


#: Text that is more than white space: what DRF's ``CharField`` (which strips, then refuses a
#: blank) and the filters (``consortium.core.api.filtering``) take. White space here is Python's
#: (``str.strip``), which counts U+001C-U+001F and U+0085 where a schema's ``\s`` does not.
NOT_BLANK_PATTERN = r"[^\s\x1c-\x1f\x85]"


def _require_a_character(schema: dict[str, Any]) -> None:
    """A text field or parameter that must not be blank: say that it needs a visible character."""
    if schema.get("type") != "string" or schema.get("readOnly"):
        return
    if any(key in schema for key in ("enum", "format", "pattern")):
        return
    if schema.get("minLength", 0) >= 1:
        schema["pattern"] = NOT_BLANK_PATTERN


#: drf-spectacular's pattern for a decimal as text: every part optional, so "" and "-" match.
_DECIMAL_PATTERN = re.compile(r"\^-\?\\d\{0,(\d+)\}\(\?:\\\.\\d\{0,(\d+)\}\)\?\$")


def _tighten_decimal_patterns(node: Any) -> None:
    """Every decimal-as-text pattern made to need a digit, as DRF's DecimalField does."""
    if isinstance(node, dict):
        pattern = node.get("pattern")
        if node.get("format") == "decimal" and isinstance(pattern, str):
            match = _DECIMAL_PATTERN.fullmatch(pattern)
            if match:
                whole, fraction = match.groups()
                integral = rf"\d{{1,{whole}}}" if int(whole) else "0"
                node["pattern"] = (
                    rf"^-?(?:{integral}(?:\.\d{{0,{fraction}}})?|\.\d{{1,{fraction}}})$"
                )
        for value in node.values():
            _tighten_decimal_patterns(value)
    elif isinstance(node, list):
        for value in node:
            _tighten_decimal_patterns(value)


def _error_component() -> dict[str, Any]:
    """The ``Error`` schema: the serializer's fields, and any field's list of errors."""
    return {
        "type": "object",
        "description": " ".join((ErrorSerializer.__doc__ or "").split()),
        "properties": {
            "detail": {"type": "string", "description": "What went wrong, in words."},
            "code": {"type": "string", "description": "A stable code to branch on."},
            "problems": {"type": "array", "items": {"type": "object"}},
        },
        "additionalProperties": True,
    }
