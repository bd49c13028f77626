"""Permissions for the API, enforced by default (docs/architecture.md, section 6).

Every viewset derives from :class:`GovernanceViewSet` and declares a
``permission_map`` from each action to a rules permission name (registered by an app's
``permissions`` module). An action missing from the map is refused, so a new
action is closed until someone decides who may use it.

Where a permission is decided:

* on the URL's object (retrieve, partial_update, destroy, publish...): the object
  is fetched from the user-scoped queryset (``selectors.*_visible_to``), then the
  permission is checked against it;
* on an object named in the request body (the consortium an institution is
  created in, the institution that signs): ``input_targets`` names the validated
  field, and :meth:`GovernanceViewSet.validated_input` checks it after
  validation, before the view calls its service.

A missing object, an invisible one and a visible one the user may not act on all
give the same 404 with the same body, so ids cannot be probed. An act the user may do but that
needs a second factor the request lacks (:mod:`consortium.core.second_factor`) is 403 with the
code ``second_factor_required``, after the rule said yes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import rules
from django.core.exceptions import ImproperlyConfigured
from django.http import Http404
from django.urls import reverse
from rest_framework import exceptions, permissions, viewsets
from rest_framework.exceptions import NotFound

from consortium.core.access import may
from consortium.core.api.strict_input import type_errors
from consortium.core.converters import ID_PATTERN
from consortium.core.second_factor import SECOND_FACTOR_REQUIRED_CODE, needs_second_factor

# Marker for actions any signed-in user may call, because what they reach is
# already scoped: lists over a ``*_visible_to`` queryset, accepting one's own
# invitation. It must still be named in the map: absent means refused.
VISIBLE = "visible"

NOT_FOUND = "Not found."

PermissionRule = str | Mapping[type, str]


def required_permission(view, obj) -> str | None:
    """The permission ``view.action`` needs on ``obj``; None means refuse.

    A rule may be a permission name, or a mapping from the target's model to a
    name (an invitation to an institution needs another right than one to the
    consortium).
    """
    rule: Any = getattr(view, "permission_map", {}).get(getattr(view, "action", None))
    if isinstance(rule, Mapping):
        rule = rule.get(type(obj))
    return rule if isinstance(rule, str) and rule else None


class ActionPermission(permissions.BasePermission):
    """Signed-in users only, and only for actions named in ``permission_map``."""

    message = "This action is not available."

    def has_permission(self, request, view) -> bool:
        if not (request.user and request.user.is_authenticated):
            return False
        action_map = getattr(view, "action_map", None)
        if action_map is not None and request.method.lower() not in action_map:
            # The viewset binds no handler to this method: let it answer 405.
            return True
        return getattr(view, "action", None) in getattr(view, "permission_map", {})

    def has_object_permission(self, request, view, obj) -> bool:
        perm = required_permission(view, obj)
        if perm is None:
            return False
        if perm == VISIBLE:
            return True
        if not may(request.user, perm, obj):
            return False
        if needs_second_factor(request, perm):
            # Only now, once the rule said yes: a refusal for want of a second factor must
            # not tell an object the caller may not act on from one it may.
            raise SecondFactorRequired()
        return True


#: The codes of a related field's lookup that found nothing (slug or id of no object).
_MISSING_OBJECT_CODES = {"does_not_exist"}


def _names_a_missing_object(errors: Mapping[str, Any]) -> bool:
    """Whether a field's error is that no object (visible to the caller: the related fields
    look among those) has the slug or id it names."""
    for field_errors in errors.values():
        if not isinstance(field_errors, list):
            continue
        for error in field_errors:
            if getattr(error, "code", None) in _MISSING_OBJECT_CODES:
                return True
    return False


class SecondFactorRequired(exceptions.PermissionDenied):
    """The act needs a second factor the request lacks (403, ``second_factor_required``)."""

    default_code = SECOND_FACTOR_REQUIRED_CODE

    def __init__(self):
        super().__init__(
            {
                "detail": "This act needs a second factor. In the browser, verify at "
                f"{reverse('consortium:two-factor-verify')} (set up an authenticator app at "
                f"{reverse('consortium:two-factor')} first if you have none). With an API "
                "token: create an 'act' token from a session that has verified its second "
                f"factor ({reverse('consortium:api-token-list')}); tokens made otherwise, "
                "including by manage.py create_api_token, cannot do this act.",
                "code": SECOND_FACTOR_REQUIRED_CODE,
            }
        )


class GovernanceViewSet(viewsets.GenericViewSet):
    """Base for every API viewset: permissions by action, scoped querysets, 404s
    that do not tell a forbidden object from a missing one."""

    permission_classes = [ActionPermission]
    permission_map: Mapping[str, PermissionRule] = {}
    # action -> validated field (or fields, the first one present wins) whose
    # object the action's permission is checked against.
    input_targets: Mapping[str, str | tuple[str, ...]] = {}

    @classmethod
    def as_view(cls, actions=None, **initkwargs):
        cls.check_permission_map()
        return super().as_view(actions, **initkwargs)

    @classmethod
    def check_permission_map(cls) -> None:
        """Refuse to build a URL for a viewset naming an unregistered permission."""
        for action_name, rule in cls.permission_map.items():
            names = rule.values() if isinstance(rule, Mapping) else [rule]
            for name in names:
                if name != VISIBLE and not rules.perm_exists(name):
                    raise ImproperlyConfigured(
                        f"{cls.__name__}.permission_map[{action_name!r}] = {name!r} is not a "
                        "registered permission (see the apps' permissions modules)."
                    )

    def visible_queryset(self, user):
        """The selector-scoped queryset of what ``user`` may see."""
        raise NotImplementedError

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            # Schema generation: no user, only the model matters.
            return self.queryset.none()
        return self.visible_queryset(self.request.user)

    def get_object(self):
        lookup = self.kwargs.get(self.lookup_url_kwarg or self.lookup_field)
        if self.lookup_field == "pk" and not re.fullmatch(ID_PATTERN, str(lookup)):
            # Not an id the database can hold: the 404 of a missing object, before any query
            # (a 23-digit id once reached the database and overflowed there, a 500).
            raise NotFound(NOT_FOUND)
        try:
            return super().get_object()
        except Http404:
            # The same body as a forbidden object (Django's message names the model).
            raise NotFound(NOT_FOUND) from None

    def check_object_permissions(self, request, obj) -> None:
        if self.action in self.input_targets:
            # The URL's object only has to be visible (it came from the scoped
            # queryset); the permission is checked on the body's target.
            return
        self._require(obj)

    def _require(self, obj) -> None:
        for permission in self.get_permissions():
            if not permission.has_object_permission(self.request, self, obj):
                raise NotFound(NOT_FOUND)

    def validated_input(self, serializer_class=None) -> dict[str, Any]:
        """Validate the request body and check the action's permission on the
        object it names. Views read their input only through this."""
        serializer_class = serializer_class or self.get_serializer_class()
        serializer = serializer_class(data=self.request.data, context=self.get_serializer_context())
        fields = self.input_targets.get(self.action)
        names = ((fields,) if isinstance(fields, str) else fields) if fields else ()
        # JSON carries types; a form upload (a file endpoint) has only text to give.
        json_body = (self.request.content_type or "").startswith("application/json")
        wrong_types = type_errors(serializer, self.request.data) if json_body else {}
        if wrong_types:
            raise exceptions.ValidationError(wrong_types)
        if not serializer.is_valid():
            if _names_a_missing_object(serializer.errors):
                # An object named in the body that does not exist answers as one the caller may
                # not see or act on (below), as one named in the URL does: not a 400 "does not
                # exist" beside a 404.
                raise NotFound(NOT_FOUND)
            raise exceptions.ValidationError(serializer.errors)
        data = serializer.validated_data
        if names:
            target = next((data[n] for n in names if data.get(n) is not None), None)
            if target is None:
                raise NotFound(NOT_FOUND)
            self._require(target)
        return data
