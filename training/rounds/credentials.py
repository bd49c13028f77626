"""Site workers' credentials: creating, revoking and authenticating them.

A site worker holds no central database credentials (docs/architecture.md, section 2). It is known
here by a
:class:`~training.models.SiteCredential`: an API token (only its SHA-256 is stored; the token
is shown once, when created) and the worker's Ed25519 public key. Through the REST API
(``training.rounds.site_api``), authenticated as its site by
:func:`site_credential_authenticate`, it fetches the model it was sent and uploads its signed
update (``training.rounds.intake``), signed with the key registered here.

Creation and revocation are ledger entries; a revocation takes the ledger's lock, so an upload
in flight that has not been recorded yet sees it (the intake checks again under that lock).
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets

from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.errors import ConflictError
from consortium.core.prepared import PreparedQuery
from consortium.governance.models import Institution
from consortium.governance.services.institutions import (
    key_fingerprint,
    validate_worker_public_key,
)
from training.models import SiteCredential
from training.rounds.artifacts import sha256_hex

__all__ = [
    "LAST_USED_RESOLUTION",
    "TOKEN_PREFIX",
    "TOKEN_PREFIX_LENGTH",
    "site_actor_repr",
    "site_credential_authenticate",
    "site_credential_create",
    "site_credential_revoke",
    "site_token_revoked",
]

TOKEN_PREFIX = "fls_"
#: How many of the token's first characters are kept, to tell credentials apart.
TOKEN_PREFIX_LENGTH = 12
#: last_used_at is written at most this often per credential.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)


def _hash_token(token: str) -> str:
    return sha256_hex(token.encode("utf-8"))


def _clean_label(label: str) -> str:
    label = (label or "").strip()
    if not label:
        raise ValidationError({"label": "Name the worker (e.g. 'gpu-node-1'), to tell it apart."})
    if len(label) > 100:
        raise ValidationError({"label": "Use at most 100 characters."})
    return label


def site_credential_create(
    *, acting_user, institution: Institution, label: str, public_key: str = ""
) -> tuple[SiteCredential, str]:
    """Create a site worker's credentials and return them with the token.

    The token is returned once and never stored (only its SHA-256 and its first
    characters are). ``public_key`` is the worker's Ed25519 public key (PEM);
    left empty, the institution's registered worker key is used.
    """
    label = _clean_label(label)
    try:
        key = validate_worker_public_key(public_key)
    except ValidationError as exc:
        raise ValidationError({"public_key": exc.messages}) from None
    key = key or (institution.worker_public_key or "").strip()
    if not key:
        raise ValidationError(
            {
                "public_key": "Paste the worker's Ed25519 public key (PEM), or register a "
                "worker key on the institution first."
            }
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        credential = SiteCredential.objects.create(
            institution=institution,
            label=label,
            token_prefix=token[:TOKEN_PREFIX_LENGTH],
            token_hash=_hash_token(token),
            public_key=key,
            created_by=acting_user,
        )
        append_entry(
            event=ledger_events.CREDENTIAL_CREATED,
            actor=acting_user,
            subject=credential,
            consortium_slug=institution.consortium.slug,
            institution_slug=institution.slug,
            payload={
                "label": label,
                "token_prefix": credential.token_prefix,
                "key_fingerprint": key_fingerprint(key),
            },
        )
    return credential, token


def site_credential_revoke(*, acting_user, credential: SiteCredential) -> SiteCredential:
    """Revoke a worker's credentials: its token is refused from now on, and so
    are uploads in flight that have not been recorded yet."""
    with transaction.atomic():
        lock_chain()
        credential = (
            SiteCredential.objects.select_for_update(of=("self",))
            .select_related("institution__consortium")
            .get(pk=credential.pk)
        )
        if credential.revoked_at is not None:
            raise ConflictError(
                f"The credential '{credential.label}' ({credential.token_prefix}…) was already "
                f"revoked on {credential.revoked_at:%Y-%m-%d %H:%M} UTC.",
                code="already_revoked",
            )
        credential.revoked_at = timezone.now()
        credential.revoked_by = acting_user
        credential.save(update_fields=["revoked_at", "revoked_by"])
        append_entry(
            event=ledger_events.CREDENTIAL_REVOKED,
            actor=acting_user,
            subject=credential,
            consortium_slug=credential.institution.consortium.slug,
            institution_slug=credential.institution.slug,
            payload={"label": credential.label, "token_prefix": credential.token_prefix},
        )
    return credential


#: Every site request's first query (compiled once per connection: consortium.core.prepared).
_CREDENTIAL_BY_TOKEN_HASH = PreparedQuery(
    lambda digest: SiteCredential.objects.select_related("institution__consortium").filter(
        token_hash=digest
    ),
    one=True,
    digest=str,
)


def site_credential_authenticate(token: str) -> SiteCredential | None:
    """The live credential this token belongs to, or None (unknown or revoked).

    Tokens are looked up by their SHA-256, so no comparison runs over the
    secret itself. ``last_used_at`` is written at most once a minute.
    """
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = _hash_token(token)
    credential = _CREDENTIAL_BY_TOKEN_HASH.one_or_none(digest=digest)
    if credential is None or not hmac.compare_digest(credential.token_hash, digest):
        return None
    if credential.revoked_at is not None:
        return None
    now = timezone.now()
    if credential.last_used_at is None or now - credential.last_used_at >= LAST_USED_RESOLUTION:
        SiteCredential.objects.filter(pk=credential.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
        credential.last_used_at = now
    return credential


def site_token_revoked(token: str) -> bool:
    """Whether ``token`` belongs to a revoked credential (to say so when refusing it)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return False
    return SiteCredential.objects.filter(
        token_hash=_hash_token(token), revoked_at__isnull=False
    ).exists()


def site_actor_repr(credential: SiteCredential) -> str:
    """How a site worker appears as the actor of a ledger entry."""
    return (
        f"site {credential.institution.slug} worker '{credential.label}' "
        f"({credential.token_prefix}…)"
    )
