"""Who may call the site API (``/api/site/v1/``): site tokens only, from a worker that speaks
this server's site protocol.

Every request carries ``Authorization: Site fls_...``, the token of a worker's credentials
(``training.rounds.credentials``). A browser session, a password or any other scheme is refused
(401): these endpoints answer sites, and nothing else answers sites. A revoked or unknown token
is 401 too, saying which. :class:`SiteAPIView` is the base of every site endpoint
(``training.rounds.site_api``): site tokens only, and every error as ``{"detail", "code"}``.

Once the token is accepted, the request's ``X-Site-Protocol`` must name a site protocol this
server speaks (``training.site.protocol``, the one constant both sides import); a missing or
other one is refused with 426 Upgrade Required, ``code`` ``protocol_mismatch``, and a message
saying which side to upgrade. The token comes first so that a browser session or a wrong
token is told about the token, not the protocol. (No ``Upgrade`` header goes with the 426:
this is not an HTTP protocol switch, and WSGI forbids that hop-by-hop header anyway.)
"""

from __future__ import annotations

from django.contrib.auth.models import AnonymousUser
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import BasePermission
from rest_framework.views import APIView

from training.models import SiteCredential
from training.rounds.credentials import site_credential_authenticate, site_token_revoked
from training.rounds.site_selectors import site_job
from training.site.protocol import PROTOCOL_HEADER, SITE_PROTOCOL, protocol_refusal

__all__ = [
    "AUTH_KEYWORD",
    "IsSite",
    "ProtocolMismatch",
    "SiteAPIView",
    "SiteTokenAuthentication",
    "SiteTokenScheme",
]

AUTH_KEYWORD = "Site"


class SiteTokenAuthentication(BaseAuthentication):
    """``Authorization: Site <token>``. ``request.auth`` is the
    :class:`~training.models.SiteCredential`; ``request.user`` stays anonymous
    (a site is not a person and holds no user rights)."""

    keyword = AUTH_KEYWORD

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword.lower().encode():
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed(
                "Malformed site token header: send 'Authorization: Site <token>'."
            )
        try:
            token = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("The site token is not ASCII.") from None
        credential = site_credential_authenticate(token)
        if credential is None:
            if site_token_revoked(token):
                raise exceptions.AuthenticationFailed(
                    "This site token was revoked: ask the institution's data steward for new "
                    "worker credentials."
                )
            raise exceptions.AuthenticationFailed("Invalid site token.")
        return AnonymousUser(), credential

    def authenticate_header(self, request) -> str:
        return f'{self.keyword} realm="site-api"'


class SiteTokenScheme(OpenApiAuthenticationExtension):
    target_class = "training.rounds.site_api_auth.SiteTokenAuthentication"
    name = "siteToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "A site worker's token: `Site fls_...` (created by the "
            "institution's data steward; shown once). Every request also states the "
            f"worker's site protocol, `{PROTOCOL_HEADER}: {SITE_PROTOCOL}`: without it, or "
            "with another, the answer is 426 with `code` `protocol_mismatch` and what to "
            "upgrade.",
        }


class IsSite(BasePermission):
    """Only a request authenticated by a live site token."""

    def has_permission(self, request, view) -> bool:
        return isinstance(request.auth, SiteCredential)


class ProtocolMismatch(exceptions.APIException):
    """The worker states no site protocol, or one this server does not speak."""

    status_code = 426
    default_code = "protocol_mismatch"
    default_detail = "This server does not speak the site protocol of this worker."


class SiteAPIView(APIView):
    """Base of the site endpoints: site tokens only, the site protocol this server speaks
    (``site_protocol`` is the one the request stated), and every error as
    ``{"detail", "code"}``."""

    authentication_classes = [SiteTokenAuthentication]
    permission_classes = [IsSite]
    site_protocol: int

    @property
    def credential(self) -> SiteCredential:
        return self.request.auth

    def require_job(self, job_id: int) -> None:
        """The API's 404 (as for a missing job) unless this site actively takes part in it."""
        if site_job(self.credential, job_id) is None:
            raise exceptions.NotFound("Not found.")

    def initial(self, request, *args, **kwargs):
        super().initial(request, *args, **kwargs)  # the token first (401), then the protocol
        sent = request.headers.get(PROTOCOL_HEADER)
        refusal = protocol_refusal(sent)
        if refusal:
            raise ProtocolMismatch(refusal)
        self.site_protocol = int(sent)

    def permission_denied(self, request, message=None, code=None):
        raise exceptions.NotAuthenticated(
            "The site API takes only a site token: send 'Authorization: Site <token>'."
        )

    def get_exception_handler(self):
        handler = super().get_exception_handler()

        def with_code(exc, context):
            response = handler(exc, context)
            if (
                response is not None
                and isinstance(exc, exceptions.APIException)
                and isinstance(response.data, dict)
                and "detail" in response.data
                and "code" not in response.data
            ):
                codes = exc.get_codes()
                response.data["code"] = codes if isinstance(codes, str) else exc.default_code
            return response

        return with_code
