"""One error shape for the API: ``{"detail": ..., "code": ...}`` plus field errors (the
``Error`` of the OpenAPI schema, :mod:`consortium.core.api.schema`).

Service-layer errors (``consortium.core.errors.ServiceError``) become 400, 409 when
they report a conflict with the current state (a stale version, an expired
invitation), 404 when what the request names does not exist (an invitation
link that matches none), or 403 when the caller's roles do not allow the act on
what it names (an approver deciding for another hospital), with the message the
service gave. An error that carries
``problems`` (a refused training job: which term, which institution) lists them
too, each as its ``to_json()``.
"""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from consortium.core.errors import (
    ActNotAllowedError,
    ConflictError,
    NotFoundError,
    ServiceError,
)


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        code = 400
        if isinstance(exc, ConflictError):
            code = status.HTTP_409_CONFLICT
        elif isinstance(exc, NotFoundError):
            code = status.HTTP_404_NOT_FOUND
        elif isinstance(exc, ActNotAllowedError):
            code = status.HTTP_403_FORBIDDEN
        body = {"detail": str(exc), "code": exc.code}
        problems = getattr(exc, "problems", None)
        if problems:
            body["problems"] = [p.to_json() for p in problems]
        return Response(body, status=code)
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "message_dict"):
            return Response(exc.message_dict, status=400)
        return Response({"detail": " ".join(exc.messages), "code": "invalid"}, status=400)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, list):
        # A serializer's non-field ValidationError("...") renders as a bare list: the one
        # shape has it as the detail.
        response.data = {"detail": " ".join(str(m) for m in response.data), "code": "invalid"}
    return response
