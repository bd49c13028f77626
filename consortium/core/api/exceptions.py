"""One error shape for the API: ``{"detail": ..., "code": ...}`` plus field errors.

Service-layer errors (``consortium.core.errors.ServiceError``) become 400, or 409 when
they report a conflict with the current state (a stale version, an expired
invitation), with the message the service gave. An error that carries
``problems`` (a refused training job: which term, which institution) lists them
too, each as its ``to_json()``.
"""

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from consortium.core.errors import ConflictError, ServiceError


def exception_handler(exc, context):
    if isinstance(exc, ServiceError):
        code = status.HTTP_409_CONFLICT if isinstance(exc, ConflictError) else 400
        body = {"detail": str(exc), "code": exc.code}
        problems = getattr(exc, "problems", None)
        if problems:
            body["problems"] = [p.to_json() for p in problems]
        return Response(body, status=code)
    if isinstance(exc, DjangoValidationError):
        if hasattr(exc, "message_dict"):
            return Response(exc.message_dict, status=400)
        return Response({"detail": exc.messages}, status=400)
    return drf_exception_handler(exc, context)
