"""Which acts need a second factor, and whether a request has one.

A password alone is one secret, phished or reused as easily as any other. The acts that commit a
hospital or the consortium, or that let data or rights out, are asked for a second factor too: a
code from an authenticator app (TOTP, RFC 6238) or a one-time backup code (django-otp's
``otp_totp`` and ``otp_static``). ``TWO_FACTOR_REQUIRED`` (on by default in production, off in
the demo and in development) decides whether they are asked for it.

The acts are permission names (:data:`ACTS_NEEDING_SECOND_FACTOR`). The check is made where a
page or an API action is *entered* (``consortium.core.pages.PermissionRequiredMixin`` and
``consortium.core.api.permissions.ActionPermission``), not inside
:func:`consortium.core.access.may`: templates and selectors call ``may`` to decide what to show,
and the button should still show, leading to the verification page rather than vanishing.

A session is verified once ``django_otp.login`` has recorded the device it passed with (the
verification page); signing out ends the session and with it the verification. A personal API
token counts as verified only if it was created in a verified session
(``APIToken.second_factor``); ``manage.py create_api_token`` makes tokens without it.
"""

from __future__ import annotations

from django.conf import settings

__all__ = [
    "ACTS_NEEDING_SECOND_FACTOR",
    "SECOND_FACTOR_REQUIRED_CODE",
    "has_confirmed_device",
    "lacks_second_factor",
    "needs_second_factor",
    "request_is_verified",
    "second_factor_required",
]

#: The permissions whose acts need a verified second factor when ``TWO_FACTOR_REQUIRED``.
#:
#: - signing and withdrawing: a signature or a withdrawal commits an institution (and its
#:   patients' data) or ends that commitment: ``consortium.sign_agreement``,
#:   ``consortium.sign_for_an_institution``, ``consortium.withdraw_consent``,
#:   ``consortium.withdraw_for_an_institution``;
#: - approving: an approver's decision lets a job train on the institution's data:
#:   ``training.decide_job``;
#: - exporting: reports and the trained model leave the platform: ``audit.export_job_report``,
#:   ``audit.export_institution_report``, ``training.download_model``;
#: - minting credentials and rights: a site worker's token, invitations (which make members with
#:   roles), and role changes: ``training.manage_site_credentials``,
#:   ``consortium.invite_to_consortium``, ``consortium.invite_to_institution``,
#:   ``consortium.send_invitations``, and ``consortium.manage_membership``, added to the list
#:   the issue named because making a member an approver or an administrator mints the very
#:   rights the acts above need, as an invitation does.
#:
#: A page whose reading permission is not in this list but whose POST is such an act (the
#: compliance report's export, under ``audit.view_ledger``) says so with
#: ``PermissionRequiredMixin.second_factor_on_post``.
#:
#: Not in it: reading (``view_*``, ``audit.view_ledger``, ``audit.verify_ledger``), proposing,
#: changing or cancelling a job (the approvers still decide), and managing data sets or
#: agreements' drafts (nothing is committed until someone signs or approves).
ACTS_NEEDING_SECOND_FACTOR: frozenset[str] = frozenset(
    {
        "consortium.sign_agreement",
        "consortium.sign_for_an_institution",
        "consortium.withdraw_consent",
        "consortium.withdraw_for_an_institution",
        "training.decide_job",
        "audit.export_job_report",
        "audit.export_institution_report",
        "training.download_model",
        "training.manage_site_credentials",
        "consortium.invite_to_consortium",
        "consortium.invite_to_institution",
        "consortium.send_invitations",
        "consortium.manage_membership",
    }
)

#: The ``code`` of the API's 403 when the act needs a second factor the request lacks.
SECOND_FACTOR_REQUIRED_CODE = "second_factor_required"


def second_factor_required() -> bool:
    """Whether this installation asks for a second factor at all (``TWO_FACTOR_REQUIRED``)."""
    return bool(getattr(settings, "TWO_FACTOR_REQUIRED", False))


def request_is_verified(request) -> bool:
    """Whether the request carries a second factor: an API token created in a verified session
    (``request.auth.second_factor``), or a session that passed ``django_otp.login``."""
    auth = getattr(request, "auth", None)
    if auth is not None and hasattr(auth, "second_factor"):
        return bool(auth.second_factor)
    user = getattr(request, "user", None)
    is_verified = getattr(user, "is_verified", None)
    return bool(is_verified()) if callable(is_verified) else False


def lacks_second_factor(request) -> bool:
    """Whether this installation requires a second factor and ``request`` has none."""
    return second_factor_required() and not request_is_verified(request)


def needs_second_factor(request, perm: str) -> bool:
    """Whether ``perm``'s act must be refused to ``request`` for want of a second factor."""
    return perm in ACTS_NEEDING_SECOND_FACTOR and lacks_second_factor(request)


def has_confirmed_device(user) -> bool:
    """Whether ``user`` has a confirmed authenticator app (TOTP device) to verify with."""
    from django_otp.plugins.otp_totp.models import TOTPDevice

    return TOTPDevice.objects.filter(user=user, confirmed=True).exists()
