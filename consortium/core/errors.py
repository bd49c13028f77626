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
