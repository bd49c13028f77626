"""Consortia and institutions: creating them, changing an institution's details, and the
public key its site worker signs updates with (validated here, named in the ledger by its
fingerprint)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils.text import slugify

from audit.ledger import events as ledger_events
from audit.ledger.canonical import sha256_hex
from consortium.core.errors import ConflictError
from consortium.governance.models import Consortium, Institution, Membership, Role
from consortium.governance.permissions import forget_grants
from consortium.governance.services.recording import record_governance_event

#: Not a consortium's slug: .../consortia/new/ is the operator's page that starts one.
RESERVED_CONSORTIUM_SLUGS = frozenset({"new"})


def consortium_create(
    *,
    acting_user,
    name: str,
    slug: str = "",
    description: str = "",
    acting_user_joins: bool = True,
) -> Consortium:
    """Create a consortium; the acting user becomes its administrator unless
    ``acting_user_joins`` is false (the operator starting one for others:
    :func:`~consortium.governance.services.bootstrap.consortium_start`)."""
    slug = slug or slugify(name)
    if slug in RESERVED_CONSORTIUM_SLUGS:
        raise ValidationError({"slug": f"'{slug}' is reserved: choose another slug."})
    if Consortium.objects.filter(slug=slug).exists():
        raise ConflictError(f"A consortium with the slug '{slug}' already exists.")
    with transaction.atomic():
        consortium = Consortium.objects.create(name=name, slug=slug, description=description)
        if acting_user is not None and acting_user_joins:
            Membership.objects.create(
                user=acting_user, consortium=consortium, role=Role.CONSORTIUM_ADMIN
            )
            forget_grants(acting_user)
        record_governance_event(
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
        record_governance_event(
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
        record_governance_event(
            ledger_events.INSTITUTION_UPDATED,
            actor=acting_user,
            subject=institution,
            consortium=institution.consortium,
            institution=institution,
            changes=recorded,
        )
    return institution
