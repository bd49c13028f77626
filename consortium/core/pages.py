"""Base views that enforce permissions by default (docs/architecture.md, section 6).

Every page view mixes in :class:`PermissionRequiredMixin` (through the page bases of
``consortium.governance.pages``) and declares two things:

- ``permission_required``: a permission registered by an app's ``permissions`` module
  (``"consortium.<name>"``, ``"training.<name>"``, ``"audit.<name>"``), or one of the explicit
  openings :data:`SIGNED_IN` (any signed-in user; the page lists only what selectors return)
  and :data:`ANYONE` (no sign-in at all, e.g. an invitation link);
- ``get_permission_object()``: the object the permission is checked against,
  loaded through a selector scoped to the user.

A view that declares no permission, or an unknown one, fails when its URL is
built (``as_view``) and again on every request: it is never silently open.
Anonymous users are sent to the login page. An act that needs a second factor
(:mod:`consortium.core.second_factor`) in a session that has not passed one is sent to the
verification page, before anything runs. A missing object and an object the
user may not act on give the *same* 404, so ids cannot be probed.
"""

from __future__ import annotations

from typing import Any

import rules
from django.contrib import messages
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import ImproperlyConfigured, ValidationError
from django.db.models import QuerySet
from django.http import Http404, HttpResponseRedirect
from django.urls import reverse
from django.utils.http import urlencode

from consortium.core.access import may
from consortium.core.second_factor import (
    has_confirmed_device,
    lacks_second_factor,
    needs_second_factor,
)

#: Methods that read: a page's ``second_factor_on_post`` does not apply to them.
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

SIGNED_IN = "<any signed-in user>"
ANYONE = "<anyone, signed in or not>"
_OPENINGS = {SIGNED_IN, ANYONE}

# One message for "does not exist" and "not yours": nothing to tell them apart.
NOT_FOUND = "No such page."


def first_or_404(queryset: QuerySet, **lookup: Any):
    """The one object matching ``lookup`` in a user-scoped queryset, or 404."""
    obj = queryset.filter(**lookup).first()
    if obj is None:
        raise Http404(NOT_FOUND)
    return obj


class PermissionRequiredMixin:
    permission_required: str | None = None
    #: The page's POST is an act that needs a second factor (an export) though reading the page
    #: does not (``consortium.core.second_factor``).
    second_factor_on_post: bool = False

    @classmethod
    def check_permission_declared(cls) -> None:
        perm = cls.permission_required
        if not perm:
            raise ImproperlyConfigured(
                f"{cls.__name__} declares no permission_required: every page must name a "
                "registered rules permission (or SIGNED_IN / ANYONE explicitly)."
            )
        if perm not in _OPENINGS and not rules.perm_exists(perm):
            raise ImproperlyConfigured(
                f"{cls.__name__}.permission_required = {perm!r} is not a registered "
                "permission (see the apps' permissions modules)."
            )

    @classmethod
    def as_view(cls, **initkwargs):
        cls.check_permission_declared()
        return super().as_view(**initkwargs)

    def get_permission_object(self):
        raise ImproperlyConfigured(
            f"{type(self).__name__} must define get_permission_object() (load the object "
            "through a selector scoped to request.user)."
        )

    def dispatch(self, request, *args, **kwargs):
        self.check_permission_declared()
        perm = self.permission_required
        if perm != ANYONE:
            if not request.user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if perm != SIGNED_IN:
                obj = self.get_permission_object()
                if obj is None or not may(request.user, perm, obj):
                    raise Http404(NOT_FOUND)
                if needs_second_factor(request, perm) or (
                    self.second_factor_on_post
                    and request.method not in SAFE_METHODS
                    and lacks_second_factor(request)
                ):
                    return second_factor_redirect(request)
                self.permission_object = obj
        return super().dispatch(request, *args, **kwargs)


def second_factor_redirect(request) -> HttpResponseRedirect:
    """To the page that verifies the second factor (or, with no authenticator yet, the one that
    sets one up), coming back to this page after. Nothing of the act has run: a POST is answered
    with the same redirect, and the form is filled in again after."""
    if has_confirmed_device(request.user):
        target = reverse("consortium:two-factor-verify")
        messages.warning(
            request,
            "This act needs your second factor: enter a code from your authenticator app "
            "(or a backup code), then try again.",
        )
    else:
        target = reverse("consortium:two-factor-setup")
        messages.warning(
            request,
            "This act needs a second factor, and your account has none yet: set up an "
            "authenticator app, then try again.",
        )
    return HttpResponseRedirect(f"{target}?{urlencode({'next': request.get_full_path()})}")


def apply_service_errors(form, exc: Exception) -> None:
    """Attach a service's ValidationError (field errors) or ServiceError (a
    sentence) to ``form`` so the page re-renders with the user's input."""
    if isinstance(exc, ValidationError) and hasattr(exc, "error_dict"):
        for field, errors in exc.error_dict.items():
            target = field if field in form.fields else None
            for error in errors:
                form.add_error(target, error)
    elif isinstance(exc, ValidationError):
        form.add_error(None, exc)
    else:
        form.add_error(None, str(exc))


def error_message(exc: Exception) -> str:
    """A service's ValidationError or ServiceError as one sentence, for a message on the page
    an action returns to (an action has no form to put the errors on)."""
    if isinstance(exc, ValidationError):
        return " ".join(exc.messages)
    return str(exc)
