"""The one question every page, viewset, socket, template and command asks before acting for
someone: ``may(user, perm, obj)``.

Why not ``user.has_perm(perm, obj)``: Django's ``PermissionsMixin.has_perm`` answers True for
*any* permission to an active superuser, before any authentication backend is consulted, so
the ``rules`` over memberships (:mod:`consortium.governance.permissions`) were never asked for
one. A superuser could withdraw a hospital's consent, mint its site worker's token and pose as
its worker, change its data sets and revoke its credentials, all rules that say "only the
institution's own people".

A superuser is the installation's *operator*: it runs the platform (``createsuperuser``, the
Django admin, starting a consortium with its first administrator, ``/metrics``), and is no
member of any consortium by being one. It acts for a consortium or an institution only through
a membership with the role the act needs, like anybody else. So ``may`` evaluates the rule
itself (``rules.has_perm``, the rule set the apps' ``permissions`` modules register), with no
superuser shortcut; the operator's own acts are rules too (``consortium.start_consortium`` is
``is_operator``), so they stay the operator's.

The Django admin keeps asking ``user.has_perm`` for Django's model permissions (its own
business); the models it shows that carry governance weight are read-only there (the apps'
``admin`` modules). ``tests/architecture/test_no_superuser_shortcut.py`` keeps ``has_perm``
out of the product code and its templates.
"""

from __future__ import annotations

import rules
from django.core.exceptions import ImproperlyConfigured


def may(user, perm: str, obj=None) -> bool:
    """Whether ``user`` may do ``perm`` on ``obj``, by the rule alone: an inactive or anonymous
    user may nothing, and being a superuser changes nothing (the module's docstring).

    ``perm`` must be a registered rule: a typo would otherwise read as a quiet "no"
    (or, through Django's shortcut, a quiet "yes")."""
    if not rules.perm_exists(perm):
        raise ImproperlyConfigured(
            f"{perm!r} is not a registered permission (see the apps' permissions modules)."
        )
    if user is None or not user.is_active:
        return False
    return bool(rules.has_perm(perm, user, obj))
