"""Who may do what, route by route and persona by persona: the cases of the permission
matrices and the answers they expect.

The page matrices (web pages of governance, training and reports) each list their routes as
``(url name, kwargs factory, method, personas allowed, status when allowed, data)``;
:func:`permission_cases` turns such a list into one case per route and persona: the anonymous
visitor is sent to the login page, an allowed persona gets the route's status, anybody else a
404 (a forbidden object answers exactly like a missing one). The API matrices give each call
the exact code for every persona (:func:`api_codes`).
"""

from __future__ import annotations

import re

import pytest
from django.urls import reverse

LOGIN = "login"

#: The personas every matrix runs as (people of the ``cast``, tests/conftest.py); each
#: matrix adds the roles its routes concern.
BASE_PERSONAS = [
    "anonymous",
    "outsider",
    "other_member",
    "approver",
    "auditor",
    "admin",
    "superuser",
    "superuser_admin",
]

#: The superusers are answered exactly as the member they otherwise are: the operator (member of
#: nothing) as the outsider, the consortium's administrator who is also a superuser as the
#: administrator. Being a superuser grants nothing inside a consortium (consortium.core.access).
ANSWERED_AS = {"superuser": "outsider", "superuser_admin": "admin"}


def answered_as(persona: str) -> str:
    """The persona whose answers ``persona`` gets (itself, but for the superusers)."""
    return ANSWERED_AS.get(persona, persona)


# --- pages ------------------------------------------------------------------------------------


def permission_cases(routes, personas):
    """``pytest.param(url_name, kwargs, method, persona, expected, data)`` for each route and
    persona (see the module docstring)."""
    for name, kwargs, method, allowed, ok, data in routes:
        for persona in personas:
            if persona == "anonymous":
                expected = LOGIN
            elif answered_as(persona) in allowed:
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


def ask_page(scene, namespace, url_name, kwargs, method, persona, data):
    """``(url, response)``: ``persona`` opens (GET) or posts to the page ``namespace:url_name``
    at ``kwargs(scene)``, posting ``data(scene, persona)`` (or nothing)."""
    client = scene.cast.client_for(persona)
    url = reverse(f"{namespace}:{url_name}", kwargs=kwargs(scene))
    if method == "get":
        return url, client.get(url)
    return url, client.post(url, data(scene, persona) if data else {})


def assert_page_answer(response, url, method, expected):
    """The answer a page case expects: LOGIN sends to the login page and back, any other
    ``expected`` is the status code."""
    if expected == LOGIN:
        assert response.status_code == 302
        assert response.url == f"{reverse('login')}?next={url}"
        return
    assert response.status_code == expected, response.content.decode()[:3000]
    if expected == 302 and method == "post":
        # An allowed action redirects back into the app, never to the login page.
        assert not response.url.startswith(reverse("login"))


# --- the API ----------------------------------------------------------------------------------


def api_codes(personas, default, *, anonymous=401, outsider=None, **overrides) -> dict[str, int]:
    """Exact codes for every persona: ``default`` for members unless overridden; anonymous
    requests are refused before anything is looked up (401, with the API token's
    ``WWW-Authenticate: Bearer`` challenge)."""
    codes = {p: default for p in personas}
    codes["anonymous"] = anonymous
    codes["outsider"] = default if outsider is None else outsider
    codes.update(overrides)
    # The superusers get the codes of the persona they are answered as, unless named.
    for persona, like in ANSWERED_AS.items():
        if persona in codes and persona not in overrides:
            codes[persona] = codes[like]
    return codes


def assert_api_answer(response, expected):
    """The call answered ``expected``; a 404 says no more than "Not found."; a 401 carries
    the challenge that says how to authenticate."""
    assert response.status_code == expected, getattr(response, "content", response)
    if response.status_code == 401:
        assert response["WWW-Authenticate"].startswith('Bearer realm="api"')
    if response.status_code == 404:
        assert response.json() == {"detail": "Not found."}


def same_404_page(forbidden, missing) -> bool:
    """Whether a forbidden and a missing object got the same 404 page, byte for byte but for
    the CSRF token of the page's sign-out form, which is masked afresh on every response
    (random, so it tells a probe nothing)."""

    def page(response) -> bytes:
        return re.sub(rb'name="csrfmiddlewaretoken" value="[^"]+"', b"", response.content)

    return forbidden.status_code == missing.status_code == 404 and page(forbidden) == page(missing)
