"""The REST API as the tests call it: a DRF test client signed in as a user, or anonymous."""

from __future__ import annotations

from rest_framework.test import APIClient


def api(user=None) -> APIClient:
    """A client signed in as ``user`` (a user object), or anonymous for None."""
    client = APIClient()
    if user is not None:
        client.force_login(user)
    return client


def client_for(scene, who) -> APIClient:
    """A client signed in as the persona ``who`` of a permission scene (its ``user(who)``:
    None for "anonymous")."""
    return api(scene.user(who))
