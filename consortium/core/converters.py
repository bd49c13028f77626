"""Database ids in URLs and query strings, bounded to what the database can hold.

Django's ``int`` path converter takes any run of digits, so ``/api/site/v1/jobs/99999999999999
999999999/`` reached the ORM and failed there on the out-of-range integer (SQLite: "Python int
too large to convert to SQLite INTEGER"), a 500 instead of a 404. The ``id`` converter matches 1
to 18 digits (every id below 10^18 < 2^63, PostgreSQL's ``bigint``), so a longer one is no URL
at all: 404, as for any id that does not exist. The API's viewsets answer their own 404 for a
lookup that does not match :data:`ID_PATTERN`, before any query
(``consortium.core.api.permissions.GovernanceViewSet``, so that the body is the API's usual
one), and a query parameter naming an id is bounded by :data:`MAX_ID` (a 400 that says what is
wrong: ``consortium.governance.api.filters.IdFilter``).

Importing this module registers the converter; every URL module that uses ``<id:...>`` imports
it, so the registration never depends on import order.
"""

from __future__ import annotations

from django.urls import register_converter

__all__ = ["ID_PATTERN", "MAX_ID", "IdConverter"]

#: 1 to 18 digits: every id the database can hold, and nothing it cannot.
ID_PATTERN = "[0-9]{1,18}"
#: The largest id a form or query parameter accepts (PostgreSQL's ``bigint`` holds 2^63 - 1).
MAX_ID = 2**63 - 1


class IdConverter:
    regex = ID_PATTERN

    def to_python(self, value: str) -> int:
        return int(value)

    def to_url(self, value: int | str) -> str:
        return str(int(value))


register_converter(IdConverter, "id")
