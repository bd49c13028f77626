"""Personal API tokens: creating, revoking and checking them.

A script or a notebook calls ``/api/`` as a person with ``Authorization: Bearer flp_...``
(``consortium.governance.api.authentication``); a password is never sent to the API. A token
is a high-entropy random secret shown once, when created: only its SHA-256 and its first
characters are stored, so the database (or a backup of it) holds nothing that authenticates.
Every token expires (at most ``API_TOKEN_MAX_DAYS`` after it is made), can be revoked by its
owner, and is scoped: ``read`` tokens may only read, ``act`` tokens act with their owner's
rights. Creating and revoking one are ledger entries, as for site workers' credentials.
"""

from __future__ import annotations

import datetime as dt
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import sha256_hex
from consortium.core.errors import ConflictError, ServiceError
from consortium.core.second_factor import SECOND_FACTOR_REQUIRED_CODE, second_factor_required
from consortium.governance.models import APIToken, APITokenScope
from consortium.governance.services.recording import record_account_event

__all__ = [
    "TOKEN_PREFIX",
    "TOKEN_PREFIX_LENGTH",
    "TokenCheck",
    "api_token_check",
    "api_token_create",
    "api_token_revoke",
]

#: Every personal token starts so: a leaked one is recognisable (by a secret scanner, or by
#: a person reading a log), and a site worker's token (``fls_``) is told apart from it.
TOKEN_PREFIX = "flp_"
#: How many of the token's first characters are kept, to tell tokens apart in the lists.
TOKEN_PREFIX_LENGTH = 12
#: last_used_at is written at most this often per token (not one write per request).
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
_MAX_TOKEN_LENGTH = 200


def _hash_token(token: str) -> str:
    return sha256_hex(token)


def _clean_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValidationError(
            {"name": "Name the token (e.g. 'analysis notebook'), to tell it apart."}
        )
    if len(name) > 100:
        raise ValidationError({"name": "Use at most 100 characters."})
    return name


def _clean_days(days) -> int:
    limit = settings.API_TOKEN_MAX_DAYS
    if isinstance(days, bool) or not isinstance(days, int):
        raise ValidationError(
            {"days": f"Give the token's lifetime as a whole number of days, not {days!r}."}
        )
    if not 1 <= days <= limit:
        raise ValidationError(
            {
                "days": f"A token lives from 1 to {limit} days (API_TOKEN_MAX_DAYS); "
                f"{days} is out of range."
            }
        )
    return days


def api_token_create(
    *,
    acting_user,
    name: str,
    scope: str,
    days: int,
    second_factor: bool = False,
    by_operator: bool = False,
) -> tuple[APIToken, str]:
    """Create a personal API token for ``acting_user`` and return it with its secret.

    The secret is returned once and never stored (only its SHA-256 and first characters are),
    so whoever creates it must copy it now. It expires ``days`` days from now.

    ``second_factor``: the creating session verified its second factor, so the token may do the
    acts that need one (``consortium.core.second_factor``). Where the installation requires a
    second factor, an ``act`` token is made only in such a session (a person's page), or by the
    operator's command (``by_operator``), whose tokens never carry the second factor.
    """
    if acting_user is None or not acting_user.is_authenticated or not acting_user.is_active:
        raise ServiceError("Only a signed-in, active account has API tokens.", code="no_account")
    name = _clean_name(name)
    if scope not in APITokenScope.values:
        raise ValidationError(
            {"scope": f"Unknown scope {scope!r}: choose {' or '.join(APITokenScope.values)}."}
        )
    days = _clean_days(days)
    if by_operator:
        second_factor = False
    elif scope == APITokenScope.ACT and second_factor_required() and not second_factor:
        raise ServiceError(
            "An 'act' token can be created only after verifying your second factor in this "
            "session (the Two-factor page): it acts with your rights.",
            code=SECOND_FACTOR_REQUIRED_CODE,
        )
    secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = timezone.now()
    with transaction.atomic():
        token = APIToken.objects.create(
            user=acting_user,
            name=name,
            scope=scope,
            token_prefix=secret[:TOKEN_PREFIX_LENGTH],
            token_hash=_hash_token(secret),
            created_at=now,
            expires_at=now + dt.timedelta(days=days),
            second_factor=bool(second_factor),
        )
        record_account_event(
            ledger_events.API_TOKEN_CREATED,
            actor=acting_user,
            subject=token,
            user_id=acting_user.pk,
            username=acting_user.get_username(),
            name=name,
            scope=scope,
            token_prefix=token.token_prefix,
            expires_at=token.expires_at.isoformat(),
        )
    return token, secret


def api_token_revoke(*, acting_user, token: APIToken) -> APIToken:
    """Revoke one of ``acting_user``'s own tokens: it is refused from the next request on."""
    with transaction.atomic():
        token = APIToken.objects.select_for_update().select_related("user").get(pk=token.pk)
        if token.user_id != getattr(acting_user, "pk", None):
            # The pages look tokens up among the user's own; this guards every other caller.
            raise ServiceError("Only its owner can revoke an API token.", code="not_owner")
        if token.revoked_at is not None:
            raise ConflictError(
                f"The token '{token.name}' ({token.token_prefix}…) was already revoked on "
                f"{token.revoked_at:%Y-%m-%d %H:%M} UTC.",
                code="already_revoked",
            )
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])
        record_account_event(
            ledger_events.API_TOKEN_REVOKED,
            actor=acting_user,
            subject=token,
            user_id=token.user_id,
            username=token.user.get_username(),
            name=token.name,
            token_prefix=token.token_prefix,
        )
    return token


@dataclass(frozen=True)
class TokenCheck:
    """What a presented secret is worth: the live ``token``, or why it is refused
    (``refusal``: ``unknown``, ``expired``, ``revoked`` or ``inactive``)."""

    token: APIToken | None
    refusal: str = ""
    expired_at: dt.datetime | None = None


def api_token_check(secret: str) -> TokenCheck:
    """Look the secret up by its SHA-256 and say whether it is a live token.

    The lookup is by hash (unique), so no comparison runs over the secret itself, and the
    stored hash is compared again in constant time. ``last_used_at`` is written at most once
    a minute. A refusal says only what the holder of the secret may know: that it is not a
    token, or that the token it was has expired or been revoked, or its account is disabled.
    """
    if not isinstance(secret, str) or not secret.startswith(TOKEN_PREFIX):
        return TokenCheck(None, "unknown")
    if len(secret) > _MAX_TOKEN_LENGTH:
        return TokenCheck(None, "unknown")
    digest = _hash_token(secret)
    token = APIToken.objects.select_related("user").filter(token_hash=digest).first()
    if token is None or not hmac.compare_digest(token.token_hash, digest):
        return TokenCheck(None, "unknown")
    if token.revoked_at is not None:
        return TokenCheck(None, "revoked")
    now = timezone.now()
    if token.expires_at <= now:
        return TokenCheck(None, "expired", expired_at=token.expires_at)
    if not token.user.is_active:
        return TokenCheck(None, "inactive")
    if token.last_used_at is None or now - token.last_used_at >= LAST_USED_RESOLUTION:
        APIToken.objects.filter(pk=token.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
        token.last_used_at = now
    return TokenCheck(token)
