"""The signed-in person's second factor: its status, setting up an authenticator app (QR code
and secret, confirmed by a code, then the backup codes shown once), verifying this session,
new backup codes, and removing it (``consortium.governance.services.second_factor``).

Pages that show a secret or backup codes answer ``Cache-Control: no-store``. After verifying,
the person goes back to the page that asked (``?next=``, a path on this site only).
"""

from __future__ import annotations

import django_otp
import segno
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.generic import TemplateView
from django.views.generic.edit import FormView

from consortium.core.errors import ServiceError
from consortium.core.pages import SIGNED_IN, PermissionRequiredMixin, apply_service_errors
from consortium.core.second_factor import request_is_verified, second_factor_required
from consortium.governance.forms import CurrentPasswordForm, SecondFactorCodeForm
from consortium.governance.services import second_factor as service


def _next_url(request) -> str:
    """Where to go after: ``next`` if it is a path on this site, else the status page."""
    target = request.POST.get("next") or request.GET.get("next") or ""
    if target and url_has_allowed_host_and_scheme(
        target, allowed_hosts={request.get_host()}, require_https=request.is_secure()
    ):
        return target
    return reverse("consortium:two-factor")


def _no_store(response):
    response["Cache-Control"] = "no-store"
    return response


class StatusView(PermissionRequiredMixin, TemplateView):
    """Whether the account has an authenticator app, how many backup codes are left, whether
    this session is verified, and whether this installation requires it."""

    permission_required = SIGNED_IN
    template_name = "consortium/two_factor.html"

    def get_context_data(self, **kwargs):
        user = self.request.user
        return super().get_context_data(
            device=service.confirmed_totp_device(user),
            backup_codes_left=service.backup_codes_left(user),
            verified=request_is_verified(self.request),
            required=second_factor_required(),
            **kwargs,
        )


class SetupView(PermissionRequiredMixin, FormView):
    """GET shows the unconfirmed authenticator's QR code and secret; POST confirms it with a
    code and shows the backup codes, once. The session that confirmed is verified."""

    permission_required = SIGNED_IN
    template_name = "consortium/two_factor_setup.html"
    form_class = SecondFactorCodeForm

    def dispatch(self, request, *args, **kwargs):
        if request.user.is_authenticated and service.confirmed_totp_device(request.user):
            messages.info(request, "Your account already has an authenticator app.")
            return redirect("consortium:two-factor")
        return super().dispatch(request, *args, **kwargs)

    def get_form(self, form_class=None):
        form = super().get_form(form_class)
        form.fields["code"].help_text = "The six digits your authenticator app shows now."
        return form

    def get_context_data(self, **kwargs):
        device = service.totp_setup(self.request.user)
        qr = segno.make(device.config_url, error="m")
        return super().get_context_data(
            device=device,
            secret=service.totp_secret_base32(device),
            qr_data_uri=qr.svg_data_uri(scale=5, border=2, dark="#000", light="#fff"),
            next=_next_url(self.request),
            **kwargs,
        )

    def render_to_response(self, context, **response_kwargs):
        return _no_store(super().render_to_response(context, **response_kwargs))

    def form_valid(self, form):
        device = service.totp_setup(self.request.user)
        try:
            codes = service.totp_confirm(self.request.user, device, form.cleaned_data["code"])
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        django_otp.login(self.request, device)
        return _no_store(
            self.response_class(
                request=self.request,
                template=["consortium/two_factor_backup_codes.html"],
                context={"codes": codes, "next": _next_url(self.request), "view": self},
            )
        )


class VerifyView(PermissionRequiredMixin, FormView):
    """A code from the app or a backup code verifies this session (until it signs out)."""

    permission_required = SIGNED_IN
    template_name = "consortium/two_factor_verify.html"
    form_class = SecondFactorCodeForm

    def dispatch(self, request, *args, **kwargs):
        if request.user.is_authenticated and not service.confirmed_totp_device(request.user):
            setup = reverse("consortium:two-factor-setup")
            return redirect(f"{setup}?{request.GET.urlencode()}" if request.GET else setup)
        return super().dispatch(request, *args, **kwargs)

    def get_context_data(self, **kwargs):
        return super().get_context_data(next=_next_url(self.request), **kwargs)

    def form_valid(self, form):
        try:
            device = service.verify_code(self.request.user, form.cleaned_data["code"])
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        django_otp.login(self.request, device)
        left = service.backup_codes_left(self.request.user)
        if device.persistent_id.startswith("otp_static"):
            messages.warning(
                self.request,
                f"Verified with a backup code: {left} left. Make new ones on the Two-factor page "
                "before they run out.",
            )
        else:
            messages.success(self.request, "Second factor verified for this session.")
        return redirect(_next_url(self.request))


class BackupCodesView(PermissionRequiredMixin, FormView):
    """POST with the current password, in a verified session: new backup codes, shown once."""

    permission_required = SIGNED_IN
    template_name = "consortium/two_factor_password.html"
    form_class = CurrentPasswordForm
    extra_context = {
        "title": "New backup codes",
        "explanation": "New backup codes replace the old ones, which stop working.",
        "button": "Make new backup codes",
    }

    def form_valid(self, form):
        try:
            codes = service.backup_codes_regenerate(
                self.request.user,
                session_verified=request_is_verified(self.request),
                password=form.cleaned_data["password"],
            )
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        return _no_store(
            self.response_class(
                request=self.request,
                template=["consortium/two_factor_backup_codes.html"],
                context={"codes": codes, "next": reverse("consortium:two-factor"), "view": self},
            )
        )


class RemoveView(PermissionRequiredMixin, FormView):
    """POST with the current password, in a verified session: the authenticator and backup
    codes are removed."""

    permission_required = SIGNED_IN
    template_name = "consortium/two_factor_password.html"
    form_class = CurrentPasswordForm
    extra_context = {
        "title": "Remove the authenticator app",
        "explanation": "Your authenticator app and backup codes stop working. Where a second "
        "factor is required, you cannot sign, approve, export or mint credentials until you set "
        "up another.",
        "button": "Remove the authenticator app",
        "danger": True,
    }

    def form_valid(self, form):
        try:
            service.second_factor_remove(
                self.request.user,
                session_verified=request_is_verified(self.request),
                password=form.cleaned_data["password"],
            )
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        messages.success(self.request, "Your authenticator app and backup codes are removed.")
        return redirect("consortium:two-factor")
