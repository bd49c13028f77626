"""A person's second factor: an authenticator app (TOTP, RFC 6238) and ten one-time backup codes.

Setting one up is two steps, so a mistyped secret never locks anybody out: an *unconfirmed*
TOTP device is made (its secret shown as a QR code and as text), and it is confirmed only by a
right code from the app. Confirming makes the backup codes, shown once, for the day the phone is
lost; each works once. Verifying a session takes a code from either (``verify_code``); the view
then calls ``django_otp.login``. Wrong codes are throttled by django-otp on each device (each
failure doubles the wait: 1 s, 2 s, 4 s...), and the refusal says until when.

Regenerating the backup codes and removing the authenticator need a verified session and the
current password (a stolen, unlocked session alone cannot turn the second factor off).
Enabling and removing are ledger entries, as API tokens are.
"""

from __future__ import annotations

import base64

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone
from django_otp.models import Device
from django_otp.plugins.otp_static.models import StaticDevice, StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice

from audit.ledger import events as ledger_events
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.services.recording import record_account_event

__all__ = [
    "BACKUP_CODE_COUNT",
    "backup_codes_left",
    "backup_codes_regenerate",
    "confirmed_totp_device",
    "second_factor_remove",
    "totp_confirm",
    "totp_secret_base32",
    "totp_setup",
    "verify_code",
]

#: How many backup codes a person gets (each works once).
BACKUP_CODE_COUNT = 10
AUTHENTICATOR_NAME = "Authenticator app"
BACKUP_CODES_NAME = "Backup codes"


def _clean_code(code) -> str:
    code = "".join(str(code or "").split()).lower()
    if not code:
        raise ValidationError({"code": "Enter the code your authenticator app shows now."})
    if len(code) > 16:
        raise ValidationError({"code": "That is not a code: codes have at most 16 characters."})
    return code


def _throttled(device: Device) -> ValidationError | None:
    allowed, data = device.verify_is_allowed()
    if allowed:
        return None
    until = (data or {}).get("locked_until")
    when = f"after {timezone.localtime(until):%H:%M:%S %Z}" if until else "in a moment"
    return ValidationError(
        {
            "code": f"Too many wrong codes in a row: wait and try again {when} "
            "(each wrong code doubles the wait)."
        }
    )


def confirmed_totp_device(user) -> TOTPDevice | None:
    return TOTPDevice.objects.filter(user=user, confirmed=True).first()


def backup_codes_left(user) -> int:
    return StaticToken.objects.filter(device__user=user, device__confirmed=True).count()


def totp_secret_base32(device: TOTPDevice) -> str:
    """The secret as an authenticator app takes it typed in (RFC 4648 base32, no padding)."""
    return base64.b32encode(device.bin_key).decode("ascii").rstrip("=")


def totp_setup(user) -> TOTPDevice:
    """The unconfirmed authenticator the setup page shows: the one begun before (a reload shows
    the same secret), or a new one. Refused if the account already has a confirmed one."""
    if confirmed_totp_device(user) is not None:
        raise ConflictError(
            "Your account already has an authenticator app: remove it first to set up another.",
            code="second_factor_exists",
        )
    device = TOTPDevice.objects.filter(user=user, confirmed=False).order_by("-pk").first()
    if device is None:
        device = TOTPDevice.objects.create(user=user, name=AUTHENTICATOR_NAME, confirmed=False)
    return device


def _new_backup_codes(user) -> list[str]:
    StaticDevice.objects.filter(user=user).delete()
    device = StaticDevice.objects.create(user=user, name=BACKUP_CODES_NAME, confirmed=True)
    codes: list[str] = []
    while len(codes) < BACKUP_CODE_COUNT:
        code = StaticToken.random_token()
        if code not in codes:
            codes.append(code)
    StaticToken.objects.bulk_create(StaticToken(device=device, token=c) for c in codes)
    return codes


def totp_confirm(user, device: TOTPDevice, code) -> list[str]:
    """Confirm ``device`` with a right ``code`` from the app, and return the new backup codes
    (to be shown once). A wrong code confirms nothing and counts towards the throttle."""
    code = _clean_code(code)
    with transaction.atomic():
        device = TOTPDevice.objects.select_for_update().get(pk=device.pk)
        if device.user_id != user.pk:
            raise ServiceError("This authenticator is not yours.", code="not_owner")
        if device.confirmed:
            raise ConflictError("This authenticator is already confirmed.", code="confirmed")
        refusal = _throttled(device)
        if refusal is not None:
            raise refusal
        if not device.verify_token(code):
            # verify_token recorded the failure (the throttle): raised after the block, so that
            # write is kept.
            wrong = ValidationError(
                {
                    "code": "That code is not the one your app shows now: check the app's clock "
                    "and type the six digits shown for this account."
                }
            )
        else:
            wrong = None
            device.confirmed = True
            device.save(update_fields=["confirmed"])
            codes = _new_backup_codes(user)
            record_account_event(
                ledger_events.SECOND_FACTOR_ENABLED,
                actor=user,
                subject=device,
                user_id=user.pk,
                username=user.get_username(),
                device=device.name,
            )
    if wrong is not None:
        raise wrong
    return codes


def verify_code(user, code) -> Device:
    """The device (authenticator or backup codes) that accepts ``code`` for ``user``; a backup
    code is used up. A wrong code is refused and counted (throttled) on each device tried."""
    code = _clean_code(code)
    totp = confirmed_totp_device(user)
    if totp is None:
        raise ServiceError(
            "Your account has no authenticator app yet: set one up first.", code="no_device"
        )
    # Six digits are the app's code, anything else a backup code (eight letters and digits):
    # only the device the code is for is tried, so a backup code does not count as a wrong
    # code against the app (and its throttle), nor the other way round.
    if code.isdigit() and len(code) == totp.digits:
        devices: list[Device] = [totp]
    else:
        devices = list(StaticDevice.objects.filter(user=user, confirmed=True))
    for device in devices:
        refusal = _throttled(device)
        if refusal is not None:
            raise refusal
    for device in devices:
        with transaction.atomic():
            locked = type(device).objects.select_for_update().get(pk=device.pk)
            if locked.verify_token(code):
                return locked
    raise ValidationError(
        {
            "code": "Wrong code: type the six digits your authenticator app shows now, or one "
            "of your backup codes."
        }
    )


def _require_password(user, password: str) -> None:
    if not password or not user.check_password(password):
        raise ValidationError({"password": "That is not your current password."})


def backup_codes_regenerate(user, *, session_verified: bool, password: str) -> list[str]:
    """New backup codes (the old ones stop working), in a verified session, with the password."""
    if not session_verified:
        raise ServiceError(
            "Verify your second factor in this session first.", code="second_factor_required"
        )
    _require_password(user, password)
    if confirmed_totp_device(user) is None:
        raise ServiceError("Set up an authenticator app first.", code="no_device")
    with transaction.atomic():
        return _new_backup_codes(user)


def second_factor_remove(user, *, session_verified: bool, password: str) -> None:
    """Remove the authenticator and the backup codes, in a verified session, with the password.
    Where the installation requires a second factor, the acts that need it are refused until a
    new one is set up."""
    if not session_verified:
        raise ServiceError(
            "Verify your second factor in this session first.", code="second_factor_required"
        )
    _require_password(user, password)
    with transaction.atomic():
        device = confirmed_totp_device(user)
        if device is None:
            raise ConflictError("Your account has no authenticator app.", code="no_device")
        record_account_event(
            ledger_events.SECOND_FACTOR_REMOVED,
            actor=user,
            subject=device,
            user_id=user.pk,
            username=user.get_username(),
            device=device.name,
        )
        TOTPDevice.objects.filter(user=user).delete()
        StaticDevice.objects.filter(user=user).delete()
