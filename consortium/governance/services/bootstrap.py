"""Starting a consortium: the platform operator's one act, creating a consortium with its first
administrator, after which that administrator does the rest in the browser (institutions,
members, agreements).

Nobody inside a consortium can create one (there is no consortium yet whose administrator
could), so the rule is part of the act: only an active superuser, the platform's operator, may
start one; this is checked here, for the operator's page and for ``manage.py
create_consortium`` alike. The operator becomes no member of it: the first administrator is
invited by email (the invitation's one-time link, mailed and returned to show the operator once)
or, when the operator names an existing account, granted the role directly. The ledger holds the
same entries a consortium administrator's own acts write: ``consortium.created`` and then
``member.invited`` (or ``member.joined``), all with the operator as actor.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.validators import validate_email, validate_slug
from django.db import transaction
from django.urls import reverse
from django.utils.text import slugify

from consortium.core.errors import ServiceError
from consortium.governance.models import Consortium, Invitation, Membership, Role
from consortium.governance.permissions import is_operator
from consortium.governance.services.institutions import consortium_create
from consortium.governance.services.members import (
    invitation_create,
    invitation_url,
    membership_grant,
)

NAME_MAX = Consortium._meta.get_field("name").max_length
SLUG_MAX = Consortium._meta.get_field("slug").max_length


@dataclass(frozen=True)
class ConsortiumStart:
    """What starting a consortium left: the consortium, and either the first administrator's
    invitation (``link`` is its one-time link, never stored: show it now or never) or their
    membership (``link`` is the sign-in page, the account has its password already)."""

    consortium: Consortium
    link: str
    invitation: Invitation | None = None
    membership: Membership | None = None


def _check_operator(acting_user) -> None:
    if not is_operator(acting_user):
        who = acting_user.get_username() if acting_user is not None else "Nobody"
        raise ServiceError(
            f"Only a superuser (the platform's operator) can start a consortium; {who} is not "
            "one. Create one with 'manage.py createsuperuser'.",
            code="not_operator",
        )


def _clean(name: str, slug: str, admin_email: str) -> tuple[str, str, str]:
    errors: dict[str, str] = {}
    name = " ".join((name or "").split())
    if not name:
        errors["name"] = "A consortium needs a name."
    elif len(name) > NAME_MAX:
        errors["name"] = f"Use at most {NAME_MAX} characters."
    slug = (slug or "").strip() or slugify(name)
    try:
        validate_slug(slug)
    except ValidationError:
        errors["slug"] = (
            f"'{slug}' is not a slug: use letters, digits, hyphens and underscores."
            if slug
            else "The slug must contain letters or digits."
        )
    else:
        if len(slug) > SLUG_MAX:
            errors["slug"] = f"Use at most {SLUG_MAX} characters."
    admin_email = (admin_email or "").strip().lower()
    try:
        validate_email(admin_email)
    except ValidationError:
        errors["admin_email"] = (
            f"'{admin_email}' is not an email address."
            if admin_email
            else "The first administrator's email address is required."
        )
    if errors:
        raise ValidationError(errors)
    return name, slug, admin_email


def _existing_account(username: str, email: str):
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise ValidationError(
            {
                "admin_username": f"There is no account named '{username}'. Leave the username "
                f"out to invite {email} instead: they create their account from the link."
            }
        )
    if not user.is_active:
        raise ValidationError({"admin_username": f"The account '{username}' is deactivated."})
    if (user.email or "").lower() != email:
        raise ValidationError(
            {
                "admin_username": f"The account '{username}' has the email address "
                f"{user.email or '(none)'}, not {email}."
            }
        )
    return user


def consortium_start(
    *,
    acting_user,
    name: str,
    admin_email: str,
    slug: str = "",
    description: str = "",
    admin_username: str = "",
) -> ConsortiumStart:
    """Create a consortium and its first administrator, in one transaction.

    Without ``admin_username``, ``admin_email`` is invited as consortium administrator (the
    invitation is mailed once the transaction commits, and its link returned); with it, that
    existing account (whose address must be ``admin_email``) is made administrator at once.
    """
    _check_operator(acting_user)
    name, slug, admin_email = _clean(name, slug, admin_email)
    admin = _existing_account(admin_username.strip(), admin_email) if admin_username else None
    with transaction.atomic():
        consortium = consortium_create(
            acting_user=acting_user,
            name=name,
            slug=slug,
            description=(description or "").strip(),
            acting_user_joins=False,
        )
        if admin is None:
            invitation, token = invitation_create(
                acting_user=acting_user,
                consortium=consortium,
                email=admin_email,
                role=Role.CONSORTIUM_ADMIN,
            )
            return ConsortiumStart(consortium, invitation_url(token), invitation=invitation)
        membership = membership_grant(
            acting_user=acting_user,
            user=admin,
            consortium=consortium,
            role=Role.CONSORTIUM_ADMIN,
            via="operator",
        )
    detail = reverse("consortium:consortium-detail", args=[consortium.slug])
    link = f"{settings.SITE_URL}{reverse('login')}?next={detail}"
    return ConsortiumStart(consortium, link, membership=membership)
