"""One lookup the site API's reads and writes share (credentials, site selectors, intake)."""

from __future__ import annotations

from typing import Any

from django.db.models import QuerySet


def one_or_none(queryset: QuerySet) -> Any:
    """The row of a query on a unique key, or None. ``get()`` leaves ordering out of the SQL
    (``first()`` orders by the primary key or the model's ordering, which costs a join or a
    sort and compiling them): the site API runs these lookups on every request."""
    try:
        return queryset.get()
    except queryset.model.DoesNotExist:
        return None
