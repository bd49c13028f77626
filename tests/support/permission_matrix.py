"""The expected answer of every route for every persona, as pytest parameters.

The permission-matrix tests (web pages of governance, training and reports) each list their
routes as ``(url name, kwargs factory, method, personas allowed, status when allowed, data)``;
this turns such a list into one case per route and persona: the anonymous visitor is sent to
the login page, an allowed persona gets the route's status, anybody else a 404 (a forbidden
object answers exactly like a missing one).
"""

from __future__ import annotations

import pytest

LOGIN = "login"


def permission_cases(routes, personas):
    """``pytest.param(url_name, kwargs, method, persona, expected, data)`` for each route and
    persona (see the module docstring)."""
    for name, kwargs, method, allowed, ok, data in routes:
        for persona in personas:
            if persona == "anonymous":
                expected = LOGIN
            elif persona in allowed:
                expected = ok
            else:
                expected = 404
            yield pytest.param(
                name,
                kwargs,
                method,
                persona,
                expected,
                data,
                id=f"{method}-{name}-{kwargs.__name__}-{persona}",
            )
