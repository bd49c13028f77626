"""Institutions as the ledger names them, for the reports people read.

A report's records identify an institution by its slug (the CSV and JSON are read by programs,
and the slug is what every ledger entry carries). People read names: the PDFs print
"Barts Health NHS Trust", not ``barts``. Reports are recomputed from the ledger up to a head and
nothing else, so the names come from the ledger too, as they stood at that head: the
``institution.created`` entry (its ``name``), renamed by ``institution.updated`` (its
``changes.name``). Read from the database instead, a later rename would change the pages of an
old report, and ``verify_report`` (which renders a PDF again and compares bytes) would call it
altered.

The colour of an institution's series is :func:`consortium.core.palette.institution_colour` of its
primary key, which the ``institution.created`` entry records as its subject: the same colour as on
the job page.
"""

from __future__ import annotations

import json
from typing import Any

from audit.ledger import events as ledger_events
from audit.ledger.selectors import institution_naming_rows
from consortium.core.palette import SERIES, institution_colour


class InstitutionDirectory:
    """Names (and series colours) of a consortium's institutions, fed entry by entry in ledger
    order (:meth:`observe`); an institution the ledger never introduced keeps its slug as name."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}
        self._colours: dict[str, str] = {}

    def observe(
        self, event: str, institution_slug: str, payload: dict[str, Any], subject_id: str = ""
    ) -> None:
        """Take what ``event`` (any event: only the two naming ones count) says of a name."""
        if event == ledger_events.INSTITUTION_CREATED:
            slug, name = payload.get("slug"), payload.get("name")
            if isinstance(slug, str) and isinstance(name, str):
                self._names[slug] = name
                if subject_id.isdigit():
                    self._colours[slug] = institution_colour(int(subject_id))
        elif event == ledger_events.INSTITUTION_UPDATED and institution_slug:
            new = _new_name((payload.get("changes") or {}).get("name"))
            if new:
                self._names[institution_slug] = new

    def name(self, slug: str | None) -> str:
        """The institution's name, or its slug where the ledger names none."""
        if not slug:
            return ""
        return self._names.get(slug, slug)

    def known_name(self, slug: str | None) -> str | None:
        """The institution's name where the ledger gives one, else None."""
        return self._names.get(slug) if slug else None

    def colour(self, slug: str | None) -> str:
        """The institution's series colour (the first series colour for an unknown one)."""
        return self._colours.get(slug or "", SERIES[0])

    def names(self) -> dict[str, str]:
        """Every named institution: slug -> name."""
        return dict(self._names)


def _new_name(change: Any) -> str | None:
    """The new name in an ``institution.updated`` entry's ``changes.name``: the new value as the
    service records it, or an ``{"old", "new"}`` pair or ``[old, new]`` list."""
    if isinstance(change, str):
        return change or None
    if isinstance(change, dict) and isinstance(change.get("new"), str):
        return change["new"]
    if isinstance(change, list) and len(change) == 2 and isinstance(change[1], str):
        return change[1]
    return None


def institution_directory(consortium_slug: str, up_to: int) -> InstitutionDirectory:
    """The consortium's institutions as the ledger named them at entry ``up_to``."""
    directory = InstitutionDirectory()
    for row in institution_naming_rows(consortium_slug, up_to=up_to):
        try:
            payload = json.loads(row.payload_text)
        except ValueError:
            continue  # not a name: the chain check reports a damaged entry, not this
        if isinstance(payload, dict):
            directory.observe(row.event, row.institution_slug, payload, row.subject_id)
    return directory
