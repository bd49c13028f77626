"""A JSON body's values of the types the schema gives them, before DRF's fields read them.

DRF's fields are lenient in what they take: a ``CharField`` takes the number ``0`` as the text
``"0"``, an ``IntegerField`` takes ``"7"`` and ``7.0``, a ``BooleanField`` takes ``"yes"`` and
``1``. The OpenAPI schema says text, whole number, boolean; a client that sends another type
has a bug the API should name, not paper over (and a fuzzer rightly reports the leniency as
invalid input accepted). So the API's input is checked against the declared types first, and
a value of the wrong type is a 400 naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rest_framework import serializers

_TEXT = "Must be text (a JSON string)."
_WHOLE = "Must be a whole number (a JSON integer)."
_BOOLEAN = "Must be true or false (a JSON boolean)."


def _type_error(field: serializers.Field, value: Any) -> str | None:
    if value is None:
        return None  # allow_null is the field's own business
    if isinstance(field, serializers.BooleanField):
        return None if isinstance(value, bool) else _BOOLEAN
    if isinstance(field, serializers.IntegerField):
        return None if isinstance(value, int) and not isinstance(value, bool) else _WHOLE
    if isinstance(field, serializers.CharField):  # also slugs, regexes, e-mail addresses
        return None if isinstance(value, str) else _TEXT
    if isinstance(field, serializers.ListField) and isinstance(value, list):
        for item in value:
            error = _type_error(field.child, item)
            if error:
                return f"Every item: {error[0].lower()}{error[1:]}"
    return None


def type_errors(serializer: serializers.Serializer, data: Any) -> dict[str, list[str]]:
    """Each writable field of ``serializer`` whose value in ``data`` has the wrong JSON type."""
    if not isinstance(data, Mapping):
        return {}
    errors = {}
    for name, field in serializer.fields.items():
        if field.read_only or name not in data:
            continue
        error = _type_error(field, data[name])
        if error:
            errors[name] = [error]
    return errors
