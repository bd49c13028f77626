"""The API's list filters (django-filter), strict about what a filter parameter is.

django-filter reads a parameter given empty (``?consortium=``, or only white space) as no
filter at all, a
boolean it cannot read (``?current=null``) as no filter either, and a parameter given twice
as its last value: the client asked for something and got the whole list, with no word that
its question was not understood. Here a filter parameter is given once, with a value the
filter reads, or left out; anything else is a 400 that names the parameter. The OpenAPI
schema says the same (``minLength``, the boolean's two values; :mod:`consortium.core.api.schema`).
"""

from __future__ import annotations

import datetime as dt

import django_filters
from django import forms
from django_filters.rest_framework import DjangoFilterBackend
from rest_framework.exceptions import ValidationError

_BOOLEAN_VALUES = {"true", "false"}


class StrictFilterBackend(DjangoFilterBackend):
    def filter_queryset(self, request, queryset, view):
        filterset_class = self.get_filterset_class(view, queryset)
        if filterset_class is not None:
            errors = _parameter_errors(request.query_params, filterset_class.base_filters)
            if errors:
                raise ValidationError(errors)
        return super().filter_queryset(request, queryset, view)


def _parameter_errors(params, filters) -> dict[str, list[str]]:
    errors: dict[str, list[str]] = {}
    for name, filter_ in filters.items():
        values = params.getlist(name)
        if not values:
            continue
        if len(values) > 1:
            errors[name] = ["Give this parameter once."]
        elif not values[0].strip():
            errors[name] = ["Give a value, or leave the parameter out."]
        elif isinstance(filter_, django_filters.BooleanFilter) and values[0] not in _BOOLEAN_VALUES:
            errors[name] = [f"'true' or 'false', not {values[0]!r}."]
    return errors


class _UtcIsoDateTimeField(django_filters.fields.IsoDateTimeField):
    """An ISO 8601 date and time, turned to UTC before it reaches the database.

    Python accepts a UTC offset up to ±23:59 (``2026-12-06T10:00+16:24``); PostgreSQL refuses
    any beyond ±15:59 ("time zone displacement out of range", a 500 found by the API fuzz), and
    SQLite compares the text. In UTC every database reads the same instant; a time that leaves
    the years 1 to 9999 once in UTC is refused here as invalid."""

    def to_python(self, value):
        value = super().to_python(value)
        if value is None or value.tzinfo is None:
            return value
        try:
            return value.astimezone(dt.UTC)
        except OverflowError as exc:
            raise forms.ValidationError(
                "Enter a date and time that stays within the years 1 to 9999 in UTC.",
                code="invalid",
            ) from exc


class UtcIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    """``IsoDateTimeFilter`` whose value is compared in UTC (:class:`_UtcIsoDateTimeField`)."""

    field_class = _UtcIsoDateTimeField
