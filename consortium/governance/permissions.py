"""Governance's access decisions: ``rules`` predicates over memberships, and the permissions
over governance's own objects. The predicates are shared: training's rules
(``training.jobs.permissions``) and audit's (``audit.permissions``, the ledger and the reports)
are built from them and registered by their own apps.

Predicates compute rights from the user's memberships (loaded once per user
object and cached on it), so they cannot go stale the way per-object grants do.
``rules`` cannot filter querysets: lists go through ``selectors``' ``*_visible_to``
functions, which apply the same scopes.

Permission names are registered with ``rules`` (``consortium.<name>``) and checked, by views,
viewsets, sockets, templates and commands alike, with :func:`consortium.core.access.may`, never
``user.has_perm``: Django's says yes to a superuser for anything, and a superuser acts for a
consortium or an institution only through a membership, like anybody else.
"""

from __future__ import annotations

from dataclasses import dataclass

import rules

from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Consortium,
    Institution,
    Invitation,
    Membership,
    Role,
    Signature,
    Withdrawal,
)


@dataclass(frozen=True)
class Grant:
    consortium_id: int
    institution_id: int | None
    role: str


def grants_of(user) -> frozenset[Grant]:
    """The user's memberships as plain tuples, cached on the user object."""
    if user is None or not user.is_authenticated:
        return frozenset()
    cached = getattr(user, "_consortium_grants", None)
    if cached is None:
        cached = frozenset(
            Grant(c, i, r)
            for c, i, r in Membership.objects.filter(user=user).values_list(
                "consortium_id", "institution_id", "role"
            )
        )
        user._consortium_grants = cached
    return cached


def forget_grants(user) -> None:
    """Drop the cache after a membership change made in the same request."""
    if hasattr(user, "_consortium_grants"):
        del user._consortium_grants


def consortium_id_of(obj) -> int | None:
    """The consortium an object belongs to, without a query where possible."""
    if isinstance(obj, Consortium):
        return obj.pk
    if isinstance(obj, Institution | Membership | Invitation | Agreement):
        return obj.consortium_id
    if isinstance(obj, AgreementVersion):
        return obj.agreement.consortium_id
    if isinstance(obj, Signature):
        return obj.institution.consortium_id
    if isinstance(obj, Withdrawal):
        return obj.institution.consortium_id
    return getattr(obj, "consortium_id", None)


def institution_id_of(obj) -> int | None:
    if isinstance(obj, Institution):
        return obj.pk
    return getattr(obj, "institution_id", None)


def has_consortium_role(user, obj, *roles: str) -> bool:
    cid = consortium_id_of(obj)
    return any(g.consortium_id == cid and g.role in roles for g in grants_of(user))


def has_institution_role(user, obj, *roles: str) -> bool:
    iid = institution_id_of(obj)
    if iid is None:
        return False
    return any(g.institution_id == iid and g.role in roles for g in grants_of(user))


@rules.predicate
def is_consortium_member(user, obj) -> bool:
    cid = consortium_id_of(obj)
    return cid is not None and any(g.consortium_id == cid for g in grants_of(user))


@rules.predicate
def is_consortium_admin(user, obj) -> bool:
    return has_consortium_role(user, obj, Role.CONSORTIUM_ADMIN)


@rules.predicate
def is_auditor(user, obj) -> bool:
    return has_consortium_role(user, obj, Role.AUDITOR)


@rules.predicate
def is_institution_admin(user, obj) -> bool:
    return has_institution_role(user, obj, Role.INSTITUTION_ADMIN)


@rules.predicate
def is_approver(user, obj) -> bool:
    return has_institution_role(user, obj, Role.APPROVER)


@rules.predicate
def is_data_steward(user, obj) -> bool:
    return has_institution_role(user, obj, Role.DATA_STEWARD)


@rules.predicate
def is_institution_admin_of_any(user, obj) -> bool:
    """For consortium-level objects: the user administers some institution in it."""
    cid = consortium_id_of(obj)
    return any(g.consortium_id == cid and g.role == Role.INSTITUTION_ADMIN for g in grants_of(user))


@rules.predicate
def is_operator(user) -> bool:
    """An active superuser: the platform's operator. It starts consortia (and sees the state of
    the services), and by being one holds no right inside any consortium."""
    return bool(user is not None and user.is_active and user.is_superuser)


class Platform:
    """The object of an act above any consortium (starting one): the platform itself. The
    page bases refuse a missing permission object, so such a page checks against this."""

    def __repr__(self) -> str:
        return "<the platform>"


PLATFORM = Platform()

# Starting a consortium with its first administrator: the operator only.
rules.add_perm("consortium.start_consortium", is_operator)
# The state of the central services and the site workers (the dashboard's services panel):
# the platform's operators, staff (whom /metrics serves too) and the consortium's admins.
rules.add_perm(
    "consortium.view_services",
    is_operator | (rules.is_active & rules.is_staff) | is_consortium_admin,
)

# Reading governance data: any member of the consortium.
rules.add_perm("consortium.view_consortium", is_consortium_member)
rules.add_perm("consortium.view_institution", is_consortium_member)
rules.add_perm("consortium.view_agreement", is_consortium_member)
rules.add_perm("consortium.view_members", is_consortium_member)

# Changing the consortium's shape: its administrators.
rules.add_perm("consortium.add_institution", is_consortium_admin)
rules.add_perm("consortium.manage_agreements", is_consortium_admin)

# An institution's own details and worker key: its administrator or data steward.
rules.add_perm(
    "consortium.change_institution",
    is_consortium_admin | is_institution_admin | is_data_steward,
)

# Invitations: obj is the consortium (consortium roles) or an institution.
rules.add_perm("consortium.invite_to_consortium", is_consortium_admin)
rules.add_perm("consortium.invite_to_institution", is_consortium_admin | is_institution_admin)
rules.add_perm("consortium.send_invitations", is_consortium_admin | is_institution_admin_of_any)
# Role changes and removals: obj is the membership.
rules.add_perm("consortium.manage_membership", is_consortium_admin | is_institution_admin)
rules.add_perm("consortium.revoke_invitation", is_consortium_admin | is_institution_admin)

# Signing and withdrawing consent: obj is the institution.
rules.add_perm("consortium.sign_agreement", is_approver)
rules.add_perm("consortium.withdraw_consent", is_approver | is_institution_admin)


@rules.predicate
def is_approver_of_any(user, obj) -> bool:
    """For consortium-level objects (an agreement, a version): the user approves
    for some institution in it. Which institution is chosen on the form."""
    cid = consortium_id_of(obj)
    return any(g.consortium_id == cid and g.role == Role.APPROVER for g in grants_of(user))


# The signing and withdrawal pages: obj is the agreement or version. The
# institution-level checks above still decide what is submitted.
rules.add_perm("consortium.sign_for_an_institution", is_approver_of_any)
rules.add_perm(
    "consortium.withdraw_for_an_institution", is_approver_of_any | is_institution_admin_of_any
)
