"""Keyset pagination, newest first, by a unique, increasing integer column (a ledger's ``seq``).

Why not Django's ``Paginator``: it counts the rows (``SELECT COUNT(*)``) to number its pages,
and a count reads every row that matches, so a page of fifty costs as much as the whole list
(on PostgreSQL, an index-only scan of 100,000 ledger entries: about 35 ms a view). A keyset page
is addressed by the key of an entry instead of by a page number: ``?before=<key>`` is the page of
entries older than that one, ``?after=<key>`` the page of entries newer than it, and neither
the newest page. Each page reads ``size + 1`` rows through an index on the key (the one extra row
says whether there is a page beyond), and a page reached by ``before`` or ``after`` makes one more
indexed ``EXISTS`` to say whether there is one on the other side: the same queries whatever the
list's length, and no count. What is given up: a total and "page 3 of 40". An entry appended
while someone pages does not move the pages they have not seen yet, as it would with numbers.

:class:`KeysetForm` reads the position from a query string (a whole number from 0 to
:data:`~consortium.core.converters.MAX_ID`, and not both), so a bad one is a form error the page
shows, never a query; :func:`keyset_page` reads the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from django import forms
from django.db.models import QuerySet

from consortium.core.converters import MAX_ID

__all__ = ["KeysetForm", "KeysetPage", "Position", "keyset_page"]


class Position(NamedTuple):
    """Where a page starts: before a key, after one, or (both None) at the newest."""

    before: int | None
    after: int | None


def _messages(name: str) -> dict[str, str]:
    # One message for every way a position can be wrong: what it must be, not which check failed.
    text = f"“{name}” must be an entry number, a whole number from 0 to {MAX_ID}."
    return {"invalid": text, "min_value": text, "max_value": text}


class KeysetForm(forms.Form):
    """A keyset position from a query string: ``before`` or ``after`` a key, or neither (the
    newest page). Not shown as inputs: the page's Newer and Older links carry it."""

    before = forms.IntegerField(
        min_value=0, max_value=MAX_ID, required=False, error_messages=_messages("before")
    )
    after = forms.IntegerField(
        min_value=0, max_value=MAX_ID, required=False, error_messages=_messages("after")
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or self.cleaned_data
        if data.get("before") is not None and data.get("after") is not None:
            raise forms.ValidationError("Give “before” or “after”, not both.")
        return data

    def position(self) -> Position:
        """``before`` and ``after`` for :func:`keyset_page`: both None (the newest page) when
        nothing valid was asked for."""
        data = self.cleaned_data if self.is_bound and self.is_valid() else {}
        return Position(data.get("before"), data.get("after"))

    def problems(self) -> list[str]:
        """What was wrong with the position asked for, in words, for the page to show."""
        if not self.is_bound or self.is_valid():
            return []
        return [str(message) for errors in self.errors.values() for message in errors]


@dataclass(frozen=True)
class KeysetPage:
    """One page, newest first. ``items`` are the rows; ``newest_key`` and ``oldest_key`` the
    keys of the first and last (None on an empty page): the Newer link asks for
    ``after=newest_key``, the Older link for ``before=oldest_key``."""

    items: list[Any]
    has_newer: bool
    has_older: bool
    newest_key: int | None
    oldest_key: int | None
    #: The position asked for (both None: the newest page).
    before: int | None = None
    after: int | None = None

    @property
    def positioned(self) -> bool:
        """Whether this page was asked for by position, not the newest page by default."""
        return self.before is not None or self.after is not None


def keyset_page(
    queryset: QuerySet[Any],
    *,
    key: str,
    size: int,
    before: int | None = None,
    after: int | None = None,
) -> KeysetPage:
    """The page of ``queryset`` (filtered, unordered) newest first by the integer column
    ``key``: the newest ``size`` rows, or the ``size`` rows just before the key ``before``, or
    just after the key ``after`` (at most one of the two). ``key`` must be unique and served by
    an index with the queryset's filters (the ledger's ``(consortium_slug, seq)``).

    One query for the newest page, two for any other, whatever the queryset's length.
    """
    if before is not None and after is not None:
        raise ValueError("keyset_page takes before or after, not both")
    queryset = queryset.order_by()  # the order is this function's
    if after is not None:
        # The rows just after the key, oldest first, then shown newest first.
        rows = list(queryset.filter(**{f"{key}__gt": after}).order_by(key)[: size + 1])
        has_newer, rows = len(rows) > size, rows[:size][::-1]
        has_older = queryset.filter(**{f"{key}__lte": after}).exists()
    else:
        newest = queryset if before is None else queryset.filter(**{f"{key}__lt": before})
        rows = list(newest.order_by(f"-{key}")[: size + 1])
        has_older, rows = len(rows) > size, rows[:size]
        has_newer = before is not None and queryset.filter(**{f"{key}__gte": before}).exists()
    return KeysetPage(
        items=rows,
        has_newer=has_newer,
        has_older=has_older,
        newest_key=getattr(rows[0], key) if rows else None,
        oldest_key=getattr(rows[-1], key) if rows else None,
        before=before,
        after=after,
    )
