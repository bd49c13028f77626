"""Pages for a site's worker credentials: the list and the form that creates one (its token
shown once, with the worker's whole environment), and revoking one.
"""

from __future__ import annotations

import urllib.parse

from django.conf import settings
from django.contrib import messages
from django.shortcuts import redirect
from django.urls import reverse
from django.utils.functional import cached_property

from audit.ledger.keys import public_key_env_value
from consortium.core.errors import ServiceError
from consortium.core.pages import first_or_404
from consortium.governance.pages import GovernanceForm, GovernancePage, InstitutionScopedMixin
from training.models import SiteCredential
from training.rounds.credentials import site_credential_create, site_credential_revoke
from training.site.broker import site_username
from training.web.forms import SiteCredentialForm


class SiteCredentialListView(InstitutionScopedMixin, GovernanceForm):
    """The site's worker credentials, and the form that creates one. The token is
    shown in the response to the POST that created it, and never again: it is
    not stored (only its hash is), so a reload of the list cannot show it."""

    permission_required = "training.manage_site_credentials"
    template_name = "training/credential_list.html"
    form_class = SiteCredentialForm

    def get_context_data(self, **kwargs):
        return super().get_context_data(
            credentials=SiteCredential.objects.filter(institution=self.institution)
            .select_related("created_by", "revoked_by")
            .order_by("-created_at", "-pk"),
            has_institution_key=bool(self.institution.worker_public_key),
            **kwargs,
        )

    def perform(self, form):
        credential, token = site_credential_create(
            acting_user=self.request.user,
            institution=self.institution,
            label=form.cleaned_data["label"],
            public_key=form.cleaned_data["public_key"],
        )
        response = self.response_class(
            request=self.request,
            template=["training/credential_created.html"],
            context=self.get_context_data(
                credential=credential,
                token=token,
                central_url=settings.SITE_URL,
                broker=worker_broker_setting(settings.CELERY_BROKER_URL, self.institution.slug),
                private_ca=settings.SITE_URL.startswith("https://"),
                # One line (the PEM's newlines as \n) that the worker reads back: it checks
                # the centre's ledger checkpoints with it (training.site.ledger_witness).
                ledger_public_key=public_key_env_value(),
            ),
        )
        response["Cache-Control"] = "no-store"
        return response


def worker_broker_setting(broker_url: str, slug: str) -> dict:
    """What the credentials page says of the worker's ``CELERY_BROKER_URL``: ``{"kind",
    "value"}``. The central server's broker with the site's own account and a password
    placeholder (RabbitMQ: each site has its account, ``site-<slug>``), Redis's address with a
    placeholder, or nothing for the embedded broker (kind ``embedded``: only a worker on this
    machine reaches it). Never the central server's own user or password."""
    url = (broker_url or "").strip()
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if not url or scheme in {"filesystem", "memory"}:
        return {"kind": "embedded", "value": ""}
    host = parts.hostname or "broker-host"
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    if scheme.startswith("amqp") or scheme.startswith("pyamqp"):
        account = site_username(slug)
        value = f"{scheme}://{account}:<password of {account}>@{netloc}{parts.path or '/'}"
        return {"kind": "rabbitmq", "value": value, "account": account}
    if scheme.startswith("redis") or scheme.startswith("rediss"):
        return {"kind": "redis", "value": f"{scheme}://:<redis password>@{netloc}{parts.path}"}
    return {"kind": "other", "value": f"{scheme}://<user>:<password>@{netloc}{parts.path}"}


class SiteCredentialRevokeView(InstitutionScopedMixin, GovernancePage):
    """GET asks for confirmation; POST revokes the credential."""

    permission_required = "training.manage_site_credentials"
    template_name = "training/credential_revoke.html"

    @cached_property
    def credential(self):
        return first_or_404(
            SiteCredential.objects.filter(institution=self.institution), pk=self.kwargs["pk"]
        )

    def get_permission_object(self):
        # A credential of another institution is the same 404 as a forbidden one.
        self.credential  # noqa: B018
        return self.institution

    def get_context_data(self, **kwargs):
        kwargs.setdefault("credential", self.credential)
        return super().get_context_data(**kwargs)

    def post(self, request, *args, **kwargs):
        try:
            site_credential_revoke(acting_user=request.user, credential=self.credential)
        except ServiceError as exc:
            messages.error(request, str(exc))
        else:
            messages.success(
                request,
                f"The credential '{self.credential.label}' ({self.credential.token_prefix}…) "
                "is revoked: its worker's requests and uploads are refused from now on.",
            )
        return redirect(
            reverse("training:credential-list", args=[self.consortium.slug, self.institution.slug])
        )
