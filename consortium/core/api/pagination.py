"""The API's pagination: DRF's page numbers, strict about what a page number is.

DRF's paginator reads ``?page=`` (empty) as page 1 and ``?page=last`` as the last page, and
answers a malformed number with the 404 of a page past the end. The schema says a page is a
whole number from 1, so the API holds to that: a value that is not one is a 400 that names
the parameter (the client made a mistake it can fix), a page past the end is the 404 DRF gives
(the list shrank since the client counted). Both are in the OpenAPI schema
(:mod:`consortium.core.api.schema`).
"""

from __future__ import annotations

import re

from rest_framework.exceptions import ValidationError
from rest_framework.pagination import PageNumberPagination

#: A page number: a whole number from 1, at most 18 digits (the schema's maximum; a number of
#: thousands of digits would cost the server its conversion for nothing).
_PAGE_NUMBER = re.compile(r"[1-9][0-9]{0,17}")
_LARGEST_PAGE = 10**18 - 1


class StrictPageNumberPagination(PageNumberPagination):
    last_page_strings = ()

    def get_page_number(self, request, paginator):
        if self.page_query_param not in request.query_params:
            return 1
        values = request.query_params.getlist(self.page_query_param)
        if len(values) != 1 or not _PAGE_NUMBER.fullmatch(values[0]):
            raise ValidationError(
                {
                    self.page_query_param: [
                        f"A page number is a whole number from 1 to {_LARGEST_PAGE}, given once."
                    ]
                },
                code="invalid",
            )
        return int(values[0])

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": _LARGEST_PAGE}
        return parameters
