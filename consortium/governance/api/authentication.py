"""Who calls the API (``/api/``) as a person: a personal API token, or a browser session.

``Authorization: Bearer flp_...`` carries a personal API token
(``consortium.governance.services.api_tokens``). Bearer (RFC 6750), not DRF's own ``Token``
keyword: it is the standard scheme for an opaque secret, which HTTP clients, OpenAPI
(``http``/``bearer``) and ``curl --oauth2-bearer`` know, and whose challenge has standard error
codes (``invalid_token``, ``insufficient_scope``) for a client to act on.

This class comes first in ``REST_FRAMEWORK``, so an unauthenticated call is answered 401 with
its ``WWW-Authenticate: Bearer`` challenge (DRF answers 403 when the first class has no
challenge). An unknown, expired or revoked token is 401 with a body saying which; HTTP Basic
is refused the same way (a password is never accepted by the API). A ``read`` token may only
read: any other method is 403, before the view runs. The scope is checked here rather than in
a permission class because every API view passes through authentication, while views choose
their own permission classes.

The site API (``/api/site/v1/``) has its own scheme (``Site``), for hospitals' workers.
"""

from __future__ import annotations

from django.urls import reverse
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.permissions import SAFE_METHODS

from consortium.governance.models import APITokenScope
from consortium.governance.services.api_tokens import api_token_check

__all__ = ["APITokenAuthentication", "APITokenScheme", "ReadOnlyToken"]

KEYWORD = "Bearer"
REALM = "api"


def _tokens_page() -> str:
    return reverse("consortium:api-token-list")


def _refused(message: str, code: str) -> exceptions.AuthenticationFailed:
    return exceptions.AuthenticationFailed({"detail": message, "code": code})


class ReadOnlyToken(exceptions.PermissionDenied):
    """A read-only token was used for a method that changes something (403)."""

    default_code = "read_only_token"
    # RFC 6750 section 3.1; DRF's exception handler sends ``auth_header`` as WWW-Authenticate.
    auth_header = f'{KEYWORD} realm="{REALM}", error="insufficient_scope", scope="act"'


class APITokenAuthentication(BaseAuthentication):
    """``Authorization: Bearer <token>``: ``request.user`` is the token's owner and
    ``request.auth`` the :class:`~consortium.governance.models.APIToken`."""

    keyword = KEYWORD

    def authenticate(self, request):
        parts = get_authorization_header(request).split()
        if not parts:
            return None
        scheme = parts[0].lower()
        if scheme == b"basic":
            raise _refused(
                "The API does not accept passwords (HTTP Basic). Send a personal API token: "
                f"'Authorization: Bearer <token>' (create one at {_tokens_page()}).",
                "basic_not_accepted",
            )
        if scheme != self.keyword.lower().encode():
            return None  # another scheme: not ours to judge
        request._api_token_error = "invalid_request"
        if len(parts) != 2:
            raise _refused(
                "Malformed Authorization header: send 'Authorization: Bearer <token>'.",
                "token_malformed",
            )
        try:
            secret = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise _refused("The API token is not ASCII.", "token_malformed") from None
        request._api_token_error = "invalid_token"
        if secret.startswith("fls_"):
            raise _refused(
                "This is a site worker's token: it works only on the site API "
                "(/api/site/v1/, 'Authorization: Site <token>'), not as a person.",
                "token_invalid",
            )
        check = api_token_check(secret)
        if check.token is None:
            raise self._refusal(check)
        if check.token.scope == APITokenScope.READ and request.method not in SAFE_METHODS:
            raise ReadOnlyToken(
                {
                    "detail": f"This API token is read-only: it may not {request.method}. Use "
                    "a token with the 'act' scope for changes.",
                    "code": ReadOnlyToken.default_code,
                }
            )
        return check.token.user, check.token

    def _refusal(self, check) -> exceptions.AuthenticationFailed:
        page = _tokens_page()
        if check.refusal == "expired":
            return _refused(
                f"This API token expired on {check.expired_at:%Y-%m-%d %H:%M} UTC: create a new "
                f"one at {page}.",
                "token_expired",
            )
        if check.refusal == "revoked":
            return _refused(
                f"This API token was revoked: create a new one at {page}.", "token_revoked"
            )
        if check.refusal == "inactive":
            return _refused("This API token's account is disabled.", "account_inactive")
        return _refused("Invalid API token.", "token_invalid")

    def authenticate_header(self, request) -> str:
        header = f'{self.keyword} realm="{REALM}"'
        error = getattr(request, "_api_token_error", "")
        return f'{header}, error="{error}"' if error else header


class APITokenScheme(OpenApiAuthenticationExtension):
    target_class = "consortium.governance.api.authentication.APITokenAuthentication"
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A personal API token, `Authorization: Bearer flp_...`, created on "
            "the account's API tokens page (or `manage.py create_api_token`) and shown once. "
            "It expires, can be revoked, and acts with its owner's rights: a `read` token may "
            "only read (GET, HEAD, OPTIONS; anything else is 403), an `act` token may also "
            "change things. A missing, unknown, expired or revoked token is 401 with a "
            "`WWW-Authenticate: Bearer` challenge; HTTP Basic is not accepted. Where the "
            "installation requires a second factor (`TWO_FACTOR_REQUIRED`), signing, "
            "withdrawing, deciding on a job, inviting, changing roles and the other acts of "
            "`consortium.core.second_factor` are 403 with the code `second_factor_required` "
            "unless the token was created in a browser session that verified its second factor "
            "(a token from `manage.py create_api_token` never was).",
        }
