"""Governance writes. Each service checks its own preconditions, changes rows and
appends its ledger entry in one transaction: the change and its record commit
together or not at all.

Services take keyword-only arguments and an explicit ``acting_user``. They do not
check *who* may call them (views and viewsets do that through ``permissions``),
except where the rule is part of the act itself (only an institution's approver
can sign for it).
"""

from __future__ import annotations

import datetime as dt
import secrets
from decimal import Decimal
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.urls import reverse
from django.utils import timezone
from django.utils.text import slugify

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.ledger.chain import append_entry
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import (
    CONSORTIUM_ROLES,
    INSTITUTION_ROLES,
    Agreement,
    AgreementVersion,
    Consortium,
    DPMechanism,
    Institution,
    Invitation,
    Membership,
    ModelFamily,
    Purpose,
    Role,
    Signature,
    Withdrawal,
    all_purposes,
)
from consortium.governance.permissions import forget_grants, has_institution_role
from consortium.governance.selectors import current_version
from consortium.governance.signals import consent_withdrawn

User = get_user_model()


def _record(event: str, *, actor, subject, consortium: Consortium, institution=None, **payload):
    return append_entry(
        event=event,
        actor=actor,
        subject=subject,
        consortium_slug=consortium.slug,
        institution_slug=institution.slug if institution is not None else "",
        payload=payload,
    )


# --- Consortia and institutions ------------------------------------------------------


def consortium_create(
    *, acting_user, name: str, slug: str = "", description: str = ""
) -> Consortium:
    slug = slug or slugify(name)
    if Consortium.objects.filter(slug=slug).exists():
        raise ConflictError(f"A consortium with the slug '{slug}' already exists.")
    with transaction.atomic():
        consortium = Consortium.objects.create(name=name, slug=slug, description=description)
        if acting_user is not None:
            Membership.objects.create(
                user=acting_user, consortium=consortium, role=Role.CONSORTIUM_ADMIN
            )
            forget_grants(acting_user)
        _record(
            ledger_events.CONSORTIUM_CREATED,
            actor=acting_user,
            subject=consortium,
            consortium=consortium,
            name=name,
            slug=slug,
        )
    return consortium


def validate_worker_public_key(pem: str) -> str:
    """Return the key's normalised PEM, or raise ValidationError saying why not."""
    pem = (pem or "").strip()
    if not pem:
        return ""
    try:
        key = serialization.load_pem_public_key(pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise ValidationError(
            {
                "worker_public_key": "Not a PEM-encoded public key (expected a "
                "'-----BEGIN PUBLIC KEY-----' block)."
            }
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValidationError(
            {"worker_public_key": "The worker key must be an Ed25519 public key."}
        )
    return (
        key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode("ascii")
        .strip()
    )


def key_fingerprint(pem: str) -> str:
    return sha256_hex(pem)[:16] if pem else ""


RESERVED_INSTITUTION_SLUGS = frozenset({"new"})


def institution_create(
    *,
    acting_user,
    consortium: Consortium,
    name: str,
    slug: str = "",
    country: str = "",
    worker_public_key: str = "",
) -> Institution:
    """Add an institution to the consortium. Its slug later names its site queue."""
    name = name.strip()
    if not name:
        raise ValidationError({"name": "An institution needs a name."})
    slug = slugify(slug or name)
    if not slug:
        raise ValidationError({"slug": "The slug must contain letters or digits."})
    if slug in RESERVED_INSTITUTION_SLUGS:
        # .../institutions/new/ is the page that adds one: such a site's own page
        # could never be reached.
        raise ValidationError({"slug": f"'{slug}' is reserved: choose another slug."})
    key = validate_worker_public_key(worker_public_key)
    if Institution.objects.filter(slug=slug).exists():
        raise ConflictError(f"An institution with the slug '{slug}' already exists.")
    if consortium.institutions.filter(name=name).exists():
        raise ConflictError(f"'{name}' is already an institution of {consortium}.")
    with transaction.atomic():
        institution = Institution.objects.create(
            consortium=consortium, name=name, slug=slug, country=country, worker_public_key=key
        )
        _record(
            ledger_events.INSTITUTION_CREATED,
            actor=acting_user,
            subject=institution,
            consortium=consortium,
            institution=institution,
            name=name,
            slug=slug,
            country=country,
            worker_key_fingerprint=key_fingerprint(key),
        )
    return institution


def institution_update(
    *,
    acting_user,
    institution: Institution,
    name: str | None = None,
    country: str | None = None,
    worker_public_key: str | None = None,
) -> Institution:
    """Change an institution's details or register its worker key. The slug is
    fixed: it names the site's queue and appears in the ledger."""
    changes: dict[str, Any] = {}
    if name is not None and name.strip() != institution.name:
        name = name.strip()
        if not name:
            raise ValidationError({"name": "An institution needs a name."})
        if (
            institution.consortium.institutions.exclude(pk=institution.pk)
            .filter(name=name)
            .exists()
        ):
            raise ConflictError(f"'{name}' is already an institution of {institution.consortium}.")
        changes["name"] = name
    if country is not None and country != institution.country:
        changes["country"] = country
    if worker_public_key is not None:
        key = validate_worker_public_key(worker_public_key)
        if key != institution.worker_public_key:
            changes["worker_public_key"] = key
    if not changes:
        return institution
    with transaction.atomic():
        for attr, value in changes.items():
            setattr(institution, attr, value)
        institution.save(update_fields=list(changes))
        recorded = {k: v for k, v in changes.items() if k != "worker_public_key"}
        if "worker_public_key" in changes:
            recorded["worker_key_fingerprint"] = key_fingerprint(changes["worker_public_key"])
        _record(
            ledger_events.INSTITUTION_UPDATED,
            actor=acting_user,
            subject=institution,
            consortium=institution.consortium,
            institution=institution,
            changes=recorded,
        )
    return institution


# --- Invitations and memberships -------------------------------------------------------


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
        _record(
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
        raise ServiceError("This invitation link is not valid.", code="invitation_invalid")
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
        _record(
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
        _record(
            ledger_events.INVITATION_REVOKED,
            actor=acting_user,
            subject=invitation,
            consortium=invitation.consortium,
            institution=invitation.institution,
            email=invitation.email,
            role=invitation.role,
        )
    return invitation


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
        _record(
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
        _record(
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


# --- Agreements ----------------------------------------------------------------------

TERM_FIELDS = (
    "purpose",
    "permitted_purposes",
    "permitted_model_families",
    "max_shared_fraction",
    "required_dp_mechanism",
    "epsilon_cap",
    "delta",
    "valid_from",
    "valid_until",
    "text",
)


def _clean_terms(terms: dict[str, Any]) -> dict[str, Any]:
    """Validate agreement terms; raise ValidationError naming each bad field."""
    errors: dict[str, str] = {}
    unknown = set(terms) - set(TERM_FIELDS)
    if unknown:
        errors["__all__"] = f"Unknown terms: {', '.join(sorted(unknown))}."
    families = terms.get("permitted_model_families")
    if families is not None:
        families = list(dict.fromkeys(families))
        bad = [f for f in families if f not in ModelFamily.values]
        if bad or not families:
            errors["permitted_model_families"] = (
                f"Choose at least one of {', '.join(ModelFamily.values)}"
                + (f" (unknown: {', '.join(map(str, bad))})." if bad else ".")
            )
        terms["permitted_model_families"] = sorted(families)
    purposes = terms.get("permitted_purposes")
    if purposes is not None:
        purposes = list(dict.fromkeys(purposes))
        bad = [p for p in purposes if p not in Purpose.values]
        if bad or not purposes:
            errors["permitted_purposes"] = f"Choose at least one of {', '.join(Purpose.values)}" + (
                f" (unknown: {', '.join(map(str, bad))})." if bad else "."
            )
        terms["permitted_purposes"] = sorted(purposes)
    mechanism = terms.get("required_dp_mechanism")
    if mechanism is not None and mechanism not in DPMechanism.values:
        errors["required_dp_mechanism"] = f"Unknown mechanism '{mechanism}'."
    for name, low, high in (
        ("max_shared_fraction", 0, 1),
        ("epsilon_cap", 0, 10**5),
        ("delta", 0, Decimal("0.1")),
    ):
        if terms.get(name) is None:
            continue
        try:
            value = Decimal(str(terms[name]))
        except ArithmeticError:
            errors[name] = "Enter a number."
            continue
        if not value.is_finite() or not (
            low < value <= high if name != "delta" else low < value < high
        ):
            errors[name] = f"Must be above {low} and at most {high}."
        terms[name] = value
    start, end = terms.get("valid_from"), terms.get("valid_until")
    if start and end and end < start:
        errors["valid_until"] = "The agreement cannot end before it starts."
    for name in ("purpose", "text"):
        if name in terms and not str(terms[name]).strip():
            errors[name] = "This cannot be empty."
    if errors:
        raise ValidationError(errors)
    return terms


def version_terms(version: AgreementVersion) -> dict[str, Any]:
    """The version's terms as canonical, JSON-ready values."""
    return {
        "agreement_id": version.agreement_id,
        "number": version.number,
        "purpose": version.purpose,
        "permitted_purposes": sorted(version.permitted_purposes),
        "permitted_model_families": sorted(version.permitted_model_families),
        "max_shared_fraction": str(Decimal(version.max_shared_fraction).normalize()),
        "required_dp_mechanism": version.required_dp_mechanism,
        "epsilon_cap": str(Decimal(version.epsilon_cap).normalize()),
        "delta": str(Decimal(version.delta).normalize()),
        "valid_from": version.valid_from.isoformat(),
        "valid_until": version.valid_until.isoformat(),
        "text": version.text,
    }


def version_digest(version: AgreementVersion) -> str:
    """SHA-256 over the canonical terms and full text: what a signature binds to."""
    return sha256_hex(canonical_json(version_terms(version)))


def agreement_create(
    *, acting_user, consortium: Consortium, title: str, **terms: Any
) -> AgreementVersion:
    """Start a new agreement with its first draft version."""
    title = (title or "").strip()
    if not title:
        raise ValidationError({"title": "An agreement needs a title."})
    # Older clients do not send permitted purposes: every purpose is permitted then.
    if terms.get("permitted_purposes") is None:
        terms["permitted_purposes"] = all_purposes()
    missing = [f for f in TERM_FIELDS if terms.get(f) in (None, "")]
    if missing:
        raise ValidationError({f: "This term is required." for f in missing})
    terms = _clean_terms(dict(terms))
    with transaction.atomic():
        agreement = Agreement.objects.create(
            consortium=consortium, title=title, created_by=acting_user
        )
        version = AgreementVersion.objects.create(
            agreement=agreement, number=1, created_by=acting_user, **terms
        )
        _record(
            ledger_events.AGREEMENT_DRAFTED,
            actor=acting_user,
            subject=version,
            consortium=consortium,
            agreement_id=agreement.pk,
            title=title,
            version=1,
        )
    return version


def agreement_version_update(
    *, acting_user, version: AgreementVersion, **terms: Any
) -> AgreementVersion:
    """Edit a draft. Published versions are immutable: amend instead."""
    terms = _clean_terms({k: v for k, v in terms.items() if v is not None})
    with transaction.atomic():
        version = AgreementVersion.objects.select_for_update().get(pk=version.pk)
        if version.is_published:
            raise ConflictError(
                f"Version {version.number} is published and cannot change: draft an "
                "amendment instead.",
                code="version_immutable",
            )
        merged = {f: terms.get(f, getattr(version, f)) for f in TERM_FIELDS}
        _clean_terms(dict(merged))
        changed = [f for f in terms if terms[f] != getattr(version, f)]
        for name in changed:
            setattr(version, name, terms[name])
        if changed:
            version.save(update_fields=changed)
            _record(
                ledger_events.AGREEMENT_DRAFT_EDITED,
                actor=acting_user,
                subject=version,
                consortium=version.agreement.consortium,
                agreement_id=version.agreement_id,
                version=version.number,
                changed=sorted(changed),
            )
    return version


def agreement_amend(*, acting_user, agreement: Agreement) -> AgreementVersion:
    """Open a new draft version, starting from the current published terms."""
    with transaction.atomic():
        agreement = Agreement.objects.select_for_update().get(pk=agreement.pk)
        if agreement.versions.filter(status=AgreementVersion.Status.DRAFT).exists():
            raise ConflictError(
                "A draft amendment is already open: edit or publish it.", code="draft_exists"
            )
        base = current_version(agreement)
        if base is None:
            raise ConflictError("Publish the first version before amending it.")
        last_number = agreement.versions.order_by("-number").values_list("number", flat=True)[0]
        version = AgreementVersion.objects.create(
            agreement=agreement,
            number=last_number + 1,
            created_by=acting_user,
            **{f: getattr(base, f) for f in TERM_FIELDS},
        )
        _record(
            ledger_events.AGREEMENT_DRAFTED,
            actor=acting_user,
            subject=version,
            consortium=agreement.consortium,
            agreement_id=agreement.pk,
            title=agreement.title,
            version=version.number,
            amends_version=base.number,
        )
    return version


def agreement_version_publish(*, acting_user, version: AgreementVersion) -> AgreementVersion:
    """Freeze a draft: record its digest and make it the version to sign."""
    with transaction.atomic():
        version = (
            AgreementVersion.objects.select_for_update()
            .select_related("agreement__consortium")
            .get(pk=version.pk)
        )
        if version.is_published:
            raise ConflictError(
                f"Version {version.number} is already published.", code="already_published"
            )
        _clean_terms({f: getattr(version, f) for f in TERM_FIELDS})
        version.status = AgreementVersion.Status.PUBLISHED
        version.published_at = timezone.now()
        version.published_by = acting_user
        version.content_digest = version_digest(version)
        version.save(update_fields=["status", "published_at", "published_by", "content_digest"])
        _record(
            ledger_events.AGREEMENT_PUBLISHED,
            actor=acting_user,
            subject=version,
            consortium=version.agreement.consortium,
            agreement_id=version.agreement_id,
            version=version.number,
            content_digest=version.content_digest,
            terms={k: v for k, v in version_terms(version).items() if k != "text"},
        )
    return version


def _normalise_name(name: str) -> str:
    return " ".join((name or "").split()).casefold()


def agreement_sign(
    *,
    acting_user,
    version: AgreementVersion,
    institution: Institution,
    typed_name: str,
    confirmed: bool,
    expected_digest: str = "",
) -> Signature:
    """An institution's approver signs the current published version.

    ``expected_digest`` is the digest the signer was shown; if the version in
    force has changed since (an amendment was published), the signature is
    refused as stale rather than silently applied to terms not read.
    """
    if not confirmed:
        raise ValidationError(
            {
                "confirmed": "Confirm that you have read the agreement and sign on behalf of "
                "your institution."
            }
        )
    expected_names = {
        _normalise_name(acting_user.get_full_name()),
        _normalise_name(acting_user.get_username()),
    } - {""}
    if _normalise_name(typed_name) not in expected_names:
        raise ValidationError(
            {
                "typed_name": "Type your full name exactly as it appears on your account "
                f"({acting_user.get_full_name() or acting_user.get_username()})."
            }
        )
    if not has_institution_role(acting_user, institution, Role.APPROVER):
        raise ServiceError(
            f"Only an approver of {institution} can sign for it.", code="not_approver"
        )
    with transaction.atomic():
        version = (
            AgreementVersion.objects.select_for_update()
            .select_related("agreement__consortium")
            .get(pk=version.pk)
        )
        agreement = version.agreement
        if institution.consortium_id != agreement.consortium_id:
            raise ServiceError(f"{institution} is not a member of {agreement.consortium}.")
        if not version.is_published:
            raise ConflictError("A draft cannot be signed; wait until it is published.")
        latest = current_version(agreement)
        if latest is None or latest.pk != version.pk:
            raise ConflictError(
                f"Version {version.number} has been superseded by version "
                f"{latest.number if latest else '?'}: read and sign the current one.",
                code="stale_version",
            )
        if expected_digest and expected_digest != version.content_digest:
            raise ConflictError(
                "The agreement's text changed since you opened it: read it again.",
                code="stale_version",
            )
        if Withdrawal.objects.filter(agreement=agreement, institution=institution).exists():
            raise ConflictError(
                f"{institution} has withdrawn its consent under this agreement.",
                code="withdrawn",
            )
        if Signature.objects.filter(version=version, institution=institution).exists():
            raise ConflictError(
                f"{institution} has already signed version {version.number}.",
                code="already_signed",
            )
        signature = Signature.objects.create(
            version=version,
            institution=institution,
            signer=acting_user,
            signer_repr=str(typed_name).strip(),
            typed_name=str(typed_name).strip(),
            content_digest=version.content_digest,
        )
        _record(
            ledger_events.AGREEMENT_SIGNED,
            actor=acting_user,
            subject=signature,
            consortium=agreement.consortium,
            institution=institution,
            agreement_id=agreement.pk,
            version=version.number,
            content_digest=version.content_digest,
            typed_name=signature.typed_name,
        )
    return signature


def consent_withdraw(
    *, acting_user, agreement: Agreement, institution: Institution, reason: str
) -> Withdrawal:
    """Withdraw an institution's consent: it takes part in no future job."""
    reason = (reason or "").strip()
    if len(reason) < 10:
        raise ValidationError(
            {
                "reason": "Give the reason for withdrawing (at least 10 characters); it is "
                "recorded in the ledger."
            }
        )
    if institution.consortium_id != agreement.consortium_id:
        raise ServiceError(f"{institution} is not a member of {agreement.consortium}.")
    with transaction.atomic():
        if Withdrawal.objects.filter(agreement=agreement, institution=institution).exists():
            raise ConflictError(
                f"{institution} has already withdrawn its consent.", code="already_withdrawn"
            )
        withdrawal = Withdrawal.objects.create(
            agreement=agreement,
            institution=institution,
            reason=reason,
            withdrawn_by=acting_user,
            withdrawn_by_repr=acting_user.get_full_name() or acting_user.get_username(),
        )
        _record(
            ledger_events.CONSENT_WITHDRAWN,
            actor=acting_user,
            subject=withdrawal,
            consortium=agreement.consortium,
            institution=institution,
            agreement_id=agreement.pk,
            reason=reason,
        )
        consent_withdrawn.send(sender=Withdrawal, withdrawal=withdrawal, acting_user=acting_user)
    return withdrawal


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
            _record(
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
