"""Password reset by email: Django's views, with the link built from ``SITE_URL`` and the
account's sign-in lock lifted once the owner has proved they read its mail.

Every other link in mail is built from ``SITE_URL`` (invitations, notifications); the reset
link follows, rather than trusting the ``Host`` a request arrived with. Django's reset page
already answers the same for a known and an unknown address, and its link works once.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import views as auth_views

from consortium.core.lockout import clear_account_lock

__all__ = ["PasswordResetConfirmView", "PasswordResetView"]


class PasswordResetView(auth_views.PasswordResetView):
    """Sends the reset link, built from ``SITE_URL``, to the accounts with that address."""

    def form_valid(self, form):
        self.extra_email_context = {
            "site_url": settings.SITE_URL,
            "timeout_days": max(1, settings.PASSWORD_RESET_TIMEOUT // 86400),
        }
        return super().form_valid(form)


class PasswordResetConfirmView(auth_views.PasswordResetConfirmView):
    """Sets the new password, then forgets the failed sign-ins counted against the account:
    someone guessing at it could otherwise keep its owner out after the reset too."""

    def form_valid(self, form):
        response = super().form_valid(form)
        clear_account_lock(self.user.get_username())
        return response
