"""Errors raised by services. Views and the API turn them into messages.

A service raises ``ServiceError`` (or a subclass) with a sentence a person can act
on; ``code`` is a stable machine-readable name for API clients.
"""


class ServiceError(Exception):
    code = "invalid"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code:
            self.code = code


class ConflictError(ServiceError):
    """The request is well formed but conflicts with the current state."""

    code = "conflict"


class NotFoundError(ServiceError):
    """What the request names does not exist (an invitation link that matches none): the API
    answers 404, as for any object that is missing or not the caller's to see."""

    code = "not_found"


class ActNotAllowedError(ServiceError):
    """The caller may see what the act concerns but their roles do not allow the act (an
    approver of one hospital deciding for another of the consortium): the API answers 403."""

    code = "not_allowed"
