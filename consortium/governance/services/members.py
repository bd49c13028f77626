"""Invitations and memberships: inviting someone to a role by email, accepting (with an
existing account or a new one), revoking, and granting, changing or removing a role. Each
change of a user's roles forgets their cached grants (``permissions.forget_grants``)."""

from __future__ import annotations

import datetime as dt
import secrets

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.core.validators import validate_email
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import sha256_hex
from consortium.core.errors import ConflictError, NotFoundError, ServiceError
from consortium.governance.models import (
    CONSORTIUM_ROLES,
    INSTITUTION_ROLES,
    Consortium,
    Institution,
    Invitation,
    Membership,
    Role,
)
from consortium.governance.permissions import forget_grants
from consortium.governance.services.recording import record_governance_event

User = get_user_model()


def _check_role_scope(role: str, institution: Institution | None) -> None:
    if role not in Role.values:
        raise ValidationError({"role": f"Unknown role '{role}'."})
    if role in CONSORTIUM_ROLES and institution is not None:
        raise ValidationError(
            {"role": f"{Role(role).label} is a consortium-wide role: leave the institution empty."}
        )
    if role in INSTITUTION_ROLES and institution is None:
        raise ValidationError(
            {"institution": f"{Role(role).label} belongs to an institution: choose one."}
        )


def _hash_token(token: str) -> str:
    return sha256_hex(token)


def invitation_url(token: str) -> str:
    return settings.SITE_URL + reverse("consortium:invitation-accept", args=[token])


def invitation_create(
    *,
    acting_user,
    consortium: Consortium,
    email: str,
    role: str,
    institution: Institution | None = None,
) -> tuple[Invitation, str]:
    """Invite someone by email. Returns the invitation and the plain token, which
    is sent in the email and never stored (only its hash is)."""
    email = (email or "").strip().lower()
    if not email:
        raise ValidationError({"email": "An email address is required."})
    try:
        validate_email(email)
    except ValidationError:
        raise ValidationError({"email": f"'{email}' is not an email address."}) from None
    _check_role_scope(role, institution)
    if institution is not None and institution.consortium_id != consortium.pk:
        raise ValidationError({"institution": "That institution is not in this consortium."})
    if Membership.objects.filter(
        user__email__iexact=email, consortium=consortium, institution=institution, role=role
    ).exists():
        raise ConflictError(f"{email} already holds that role.")
    token = secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        invitation = Invitation.objects.create(
            consortium=consortium,
            institution=institution,
            email=email,
            role=role,
            token_hash=_hash_token(token),
            invited_by=acting_user,
            created_at=now,
            expires_at=now + dt.timedelta(hours=settings.INVITATION_TTL_HOURS),
        )
        record_governance_event(
            ledger_events.MEMBER_INVITED,
            actor=acting_user,
            subject=invitation,
            consortium=consortium,
            institution=institution,
            email=email,
            role=role,
            expires_at=invitation.expires_at.isoformat(),
        )
        where = institution.name if institution else consortium.name
        ttl = settings.INVITATION_TTL_HOURS
        transaction.on_commit(
            lambda: send_mail(
                subject=f"Invitation to join {consortium.name}",
                message=(
                    f"You have been invited to join {where} as {Role(role).label}.\n\n"
                    f"Accept within {ttl} hours: {invitation_url(token)}\n"
                ),
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=[email],
                fail_silently=False,
            )
        )
    return invitation, token


def invitation_by_token(token: str) -> Invitation:
    invitation = (
        Invitation.objects.select_related("consortium", "institution")
        .filter(token_hash=_hash_token(token or ""))
        .first()
    )
    if invitation is None:
        raise NotFoundError("This invitation link is not valid.", code="invitation_invalid")
    return invitation


def _check_invitation_usable(invitation: Invitation) -> None:
    if invitation.accepted_at is not None:
        raise ConflictError("This invitation has already been accepted.", code="invitation_used")
    if invitation.revoked_at is not None:
        raise ConflictError("This invitation was revoked.", code="invitation_revoked")
    if invitation.expires_at <= timezone.now():
        raise ConflictError(
            "This invitation has expired; ask for a new one.", code="invitation_expired"
        )


def invitation_for_acceptance(token: str) -> Invitation:
    """The invitation behind a link if it can still be accepted; otherwise the
    ServiceError (invalid link) or ConflictError (used, revoked, expired) that
    says why, for the invitation page to show before anyone fills a form."""
    invitation = invitation_by_token(token)
    _check_invitation_usable(invitation)
    return invitation


def invitation_accept(*, token: str, user) -> Membership:
    """Turn a pending invitation into a membership of the signed-in user.

    The invitation is bound to an email address: the user's must match.
    """
    with transaction.atomic():
        invitation = invitation_by_token(token)
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
        _check_invitation_usable(invitation)
        if (user.email or "").lower() != invitation.email:
            raise ServiceError(
                f"This invitation was sent to {invitation.email}; you are signed in as "
                f"{user.email or user.get_username()}.",
                code="invitation_wrong_user",
            )
        membership, _ = Membership.objects.get_or_create(
            user=user,
            consortium=invitation.consortium,
            institution=invitation.institution,
            role=invitation.role,
        )
        invitation.accepted_at = timezone.now()
        invitation.accepted_by = user
        invitation.save(update_fields=["accepted_at", "accepted_by"])
        forget_grants(user)
        record_governance_event(
            ledger_events.MEMBER_JOINED,
            actor=user,
            subject=membership,
            consortium=invitation.consortium,
            institution=invitation.institution,
            user_id=user.pk,
            username=user.get_username(),
            role=invitation.role,
            invitation_id=invitation.pk,
        )
    return membership


def invitation_accept_with_new_account(
    *, token: str, username: str, password: str, full_name: str = ""
) -> Membership:
    """Create the invitee's account (with the invited email) and accept."""
    invitation = invitation_by_token(token)
    _check_invitation_usable(invitation)
    if User.objects.filter(username=username).exists():
        raise ConflictError(f"The username '{username}' is taken.", code="username_taken")
    if User.objects.filter(email__iexact=invitation.email).exists():
        raise ConflictError(
            f"An account for {invitation.email} exists already: sign in to accept.",
            code="account_exists",
        )
    first, _, last = (full_name or "").strip().partition(" ")
    user = User(username=username, email=invitation.email, first_name=first, last_name=last)
    try:
        validate_password(password, user)
    except ValidationError as exc:
        raise ValidationError({"password": exc.messages}) from exc
    with transaction.atomic():
        user.set_password(password)
        try:
            user.save()
        except IntegrityError as exc:
            raise ConflictError(f"The username '{username}' is taken.") from exc
        return invitation_accept(token=token, user=user)


def invitation_revoke(*, acting_user, invitation: Invitation) -> Invitation:
    with transaction.atomic():
        invitation = Invitation.objects.select_for_update().get(pk=invitation.pk)
        _check_invitation_usable(invitation)
        invitation.revoked_at = timezone.now()
        invitation.save(update_fields=["revoked_at"])
        record_governance_event(
            ledger_events.INVITATION_REVOKED,
            actor=acting_user,
            subject=invitation,
            consortium=invitation.consortium,
            institution=invitation.institution,
            email=invitation.email,
            role=invitation.role,
        )
    return invitation


def membership_grant(
    *,
    acting_user,
    user,
    consortium: Consortium,
    role: str,
    institution: Institution | None = None,
    via: str = "operator",
) -> Membership:
    """Give a user a role directly, without an invitation (operators, seeding).

    Idempotent: granting a role the user already holds returns it unchanged and
    writes nothing.
    """
    _check_role_scope(role, institution)
    with transaction.atomic():
        membership, created = Membership.objects.get_or_create(
            user=user, consortium=consortium, institution=institution, role=role
        )
        if created:
            forget_grants(user)
            record_governance_event(
                ledger_events.MEMBER_JOINED,
                actor=acting_user,
                subject=membership,
                consortium=consortium,
                institution=institution,
                user_id=user.pk,
                username=user.get_username(),
                role=role,
                via=via,
            )
    return membership


def _ensure_an_admin_remains(membership: Membership) -> None:
    if membership.role != Role.CONSORTIUM_ADMIN:
        return
    others = Membership.objects.filter(
        consortium=membership.consortium, role=Role.CONSORTIUM_ADMIN
    ).exclude(pk=membership.pk)
    if not others.exists():
        raise ConflictError(
            "This is the consortium's last administrator: appoint another one first.",
            code="last_admin",
        )


def membership_change_role(*, acting_user, membership: Membership, role: str) -> Membership:
    """Give a member another role in the same scope (consortium or institution)."""
    _check_role_scope(role, membership.institution)
    if role == membership.role:
        return membership
    with transaction.atomic():
        membership = Membership.objects.select_for_update().get(pk=membership.pk)
        _ensure_an_admin_remains(membership)
        if Membership.objects.filter(
            user=membership.user,
            consortium=membership.consortium,
            institution=membership.institution,
            role=role,
        ).exists():
            raise ConflictError(f"{membership.user} already holds that role there.")
        old_role = membership.role
        membership.role = role
        membership.save(update_fields=["role"])
        forget_grants(membership.user)
        record_governance_event(
            ledger_events.MEMBER_ROLE_CHANGED,
            actor=acting_user,
            subject=membership,
            consortium=membership.consortium,
            institution=membership.institution,
            user_id=membership.user_id,
            username=membership.user.get_username(),
            old_role=old_role,
            new_role=role,
        )
    return membership


def membership_remove(*, acting_user, membership: Membership) -> None:
    with transaction.atomic():
        membership = (
            Membership.objects.select_for_update(of=("self",))
            .select_related("user", "consortium", "institution")
            .get(pk=membership.pk)
        )
        _ensure_an_admin_remains(membership)
        record_governance_event(
            ledger_events.MEMBER_REMOVED,
            actor=acting_user,
            subject=membership,
            consortium=membership.consortium,
            institution=membership.institution,
            user_id=membership.user_id,
            username=membership.user.get_username(),
            role=membership.role,
        )
        membership.delete()
        forget_grants(membership.user)
