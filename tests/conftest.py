"""Shared fixtures: a consortium with two institutions and one user per role.

``cast`` gives the people every permission test runs as: anonymous, outsider
(signed in, no membership), ``other_member`` (researcher at the *other*
institution), ``approver``, ``steward``, ``inst_admin`` and ``researcher`` of
``hospital_a``, ``auditor`` and ``admin`` of the consortium.
"""

import pytest

from tests.support.cast import make_cast
from tests.support.factories import PASSWORD


@pytest.fixture(autouse=True)
def _fast_passwords(settings):
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
    settings.AXES_ENABLED = False


@pytest.fixture
def cast(db):
    return make_cast()


@pytest.fixture
def password():
    return PASSWORD
