"""A person's own API tokens: the list with the form that creates one (its secret shown once,
in the answer to that POST), and revoking one.

Tokens are looked up among the signed-in user's own (``selectors.api_tokens_of``): another
person's token id is the same 404 as a missing one, whatever the signed-in user's roles.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.core.exceptions import ValidationError
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.functional import cached_property
from django.views.generic import TemplateView
from django.views.generic.edit import FormView

from consortium.core.errors import ServiceError
from consortium.core.pages import (
    SIGNED_IN,
    PermissionRequiredMixin,
    apply_service_errors,
    first_or_404,
)
from consortium.core.second_factor import request_is_verified, second_factor_required
from consortium.governance import selectors
from consortium.governance.forms import APITokenForm
from consortium.governance.services.api_tokens import api_token_create, api_token_revoke


class APITokenListView(PermissionRequiredMixin, FormView):
    """The user's tokens and the form that creates one. The secret is shown in the response
    to the POST that created it, never again: only its hash is stored, so a reload of the
    list cannot show it (and the response is not cached)."""

    permission_required = SIGNED_IN
    template_name = "consortium/api_token_list.html"
    form_class = APITokenForm

    def get_form_kwargs(self):
        return {**super().get_form_kwargs(), "max_days": settings.API_TOKEN_MAX_DAYS}

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            tokens=selectors.api_tokens_of(self.request.user),
            max_days=settings.API_TOKEN_MAX_DAYS,
            second_factor_required=second_factor_required(),
            verified=request_is_verified(self.request),
            **kwargs,
        )

    def form_valid(self, form):
        try:
            token, secret = api_token_create(
                acting_user=self.request.user,
                name=form.cleaned_data["name"],
                scope=form.cleaned_data["scope"],
                days=form.cleaned_data["days"],
                second_factor=request_is_verified(self.request),
            )
        except (ValidationError, ServiceError) as exc:
            apply_service_errors(form, exc)
            return self.form_invalid(form)
        response = self.response_class(
            request=self.request,
            template=["consortium/api_token_created.html"],
            context={
                "token": token,
                "secret": secret,
                "example_url": settings.SITE_URL + reverse("api:consortium-list"),
                "view": self,
            },
        )
        response["Cache-Control"] = "no-store"
        return response


class APITokenRevokeView(PermissionRequiredMixin, TemplateView):
    """GET asks for confirmation; POST revokes the token."""

    permission_required = SIGNED_IN
    template_name = "consortium/api_token_revoke.html"

    @cached_property
    def token(self):
        return first_or_404(selectors.api_tokens_of(self.request.user), pk=self.kwargs["pk"])

    def get_context_data(self, **kwargs):
        return super().get_context_data(token=self.token, **kwargs)

    def post(self, request, *args, **kwargs):
        try:
            api_token_revoke(acting_user=request.user, token=self.token)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(
                request,
                f"The API token '{self.token.name}' ({self.token.token_prefix}…) is revoked: "
                "its requests are refused from now on.",
            )
        return redirect("consortium:api-token-list")
