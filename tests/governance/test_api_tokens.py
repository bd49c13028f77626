"""Personal API tokens: the API's one way in for a script (``Authorization: Bearer``), never a
password. Tokens are hashed at rest, expire, can be revoked, are scoped to read or act, and are
listed, created (shown once) and revoked by their owner in the browser, and only by them."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import re

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.generators import SchemaGenerator
from rest_framework.test import APIClient

from audit.ledger import events as ledger_events
from audit.models import LedgerEntry
from consortium.governance.models import APIToken, Membership
from consortium.governance.services.api_tokens import (
    api_token_create,
    api_token_revoke,
)

LIST = "/api/consortia/"


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def make(user, scope="read", days=30, name="notebook"):
    return api_token_create(acting_user=user, name=name, scope=scope, days=days)


def assert_refused(response, code: str, error: str = "invalid_token") -> None:
    assert response.status_code == 401, response.content
    assert response["WWW-Authenticate"] == f'Bearer realm="api", error="{error}"'
    assert response.json()["code"] == code


# --- the API ------------------------------------------------------------------------------------


def test_a_token_authenticates_as_its_owner(cast):
    _token, secret = make(cast.researcher)
    response = bearer(secret).get(LIST)
    assert response.status_code == 200
    assert [c["slug"] for c in response.json()["results"]] == [cast.consortium.slug]
    # The outsider's token sees what the outsider sees: nothing.
    _other, outsider_secret = make(cast.outsider)
    assert bearer(outsider_secret).get(LIST).json()["results"] == []


def test_use_is_recorded_at_most_once_a_minute(cast):
    token, secret = make(cast.researcher)
    assert token.last_used_at is None
    bearer(secret).get(LIST)
    token.refresh_from_db()
    first = token.last_used_at
    assert first is not None
    bearer(secret).get(LIST)
    token.refresh_from_db()
    assert token.last_used_at == first


def test_only_the_hash_is_stored(cast):
    token, secret = make(cast.researcher)
    assert secret.startswith("flp_") and len(secret) >= 40
    row = APIToken.objects.filter(pk=token.pk).values().get()
    assert not any(secret in str(value) for value in row.values())
    assert row["token_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["token_prefix"] == secret[:12]
    # Nor is it in the ledger entry that records the creation.
    entry = LedgerEntry.objects.get(event=ledger_events.API_TOKEN_CREATED)
    assert secret not in entry.payload_text
    assert json.loads(entry.payload_text)["token_prefix"] == secret[:12]


def test_an_unknown_token_is_401_with_a_bearer_challenge(cast):
    _token, secret = make(cast.researcher)
    response = bearer(secret[:-1] + ("A" if secret[-1] != "A" else "B")).get(LIST)
    assert_refused(response, "token_invalid")
    assert response.json()["detail"] == "Invalid API token."


def test_an_expired_token_is_401_saying_so(cast):
    token, secret = make(cast.researcher)
    APIToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - dt.timedelta(seconds=1))
    response = bearer(secret).get(LIST)
    assert_refused(response, "token_expired")
    assert "expired" in response.json()["detail"]


def test_a_revoked_token_is_401_saying_so(cast):
    token, secret = make(cast.researcher)
    assert bearer(secret).get(LIST).status_code == 200
    api_token_revoke(acting_user=cast.researcher, token=token)
    response = bearer(secret).get(LIST)
    assert_refused(response, "token_revoked")
    assert "revoked" in response.json()["detail"]


def test_a_deactivated_accounts_token_is_refused(cast):
    _token, secret = make(cast.researcher)
    cast.researcher.is_active = False
    cast.researcher.save()
    assert_refused(bearer(secret).get(LIST), "account_inactive")


def test_a_malformed_header_and_a_site_token_are_refused(cast):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Bearer two parts")
    assert_refused(client.get(LIST), "token_malformed", error="invalid_request")
    response = bearer("fls_" + "x" * 40).get(LIST)
    assert_refused(response, "token_invalid")
    assert "site API" in response.json()["detail"]


def test_anonymous_is_401_with_the_challenge_not_403():
    response = APIClient().get(LIST)
    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="api"'


@pytest.mark.django_db
def test_http_basic_is_refused_even_with_the_right_password(cast, password):
    client = APIClient()
    credentials = base64.b64encode(f"researcher:{password}".encode()).decode()
    client.credentials(HTTP_AUTHORIZATION=f"Basic {credentials}")
    response = client.get(LIST)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith('Bearer realm="api"')
    assert response.json()["code"] == "basic_not_accepted"


@pytest.mark.parametrize(
    "method, url, body",
    [
        ("post", lambda c: "/api/agreements/", lambda c: {"consortium": c.consortium.slug}),
        ("patch", lambda c: f"/api/institutions/{c.hospital_a.slug}/", lambda c: {"country": "FR"}),
        (
            "delete",
            lambda c: f"/api/memberships/{Membership.objects.get(user=c.researcher).pk}/",
            lambda c: None,
        ),
    ],
    ids=["post", "patch", "delete"],
)
def test_a_read_token_may_not_change_anything(cast, method, url, body):
    _token, secret = make(cast.admin, scope="read")
    before = LedgerEntry.objects.count()
    response = getattr(bearer(secret), method)(url(cast), body(cast), format="json")
    assert response.status_code == 403
    assert response.json()["code"] == "read_only_token"
    assert "read-only" in response.json()["detail"]
    assert "insufficient_scope" in response["WWW-Authenticate"]
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.country == ""
    assert Membership.objects.filter(user=cast.researcher).exists()
    assert LedgerEntry.objects.count() == before


def test_a_read_token_may_read_and_ask_for_options(cast):
    _token, secret = make(cast.admin, scope="read")
    client = bearer(secret)
    assert client.get(f"/api/institutions/{cast.hospital_a.slug}/").status_code == 200
    assert client.head(LIST).status_code == 200
    assert client.options(LIST).status_code == 200


def test_an_act_token_acts_with_its_owners_rights(cast):
    _token, secret = make(cast.admin, scope="act")
    url = f"/api/institutions/{cast.hospital_a.slug}/"
    response = bearer(secret).patch(url, {"country": "FR"}, format="json")
    assert response.status_code == 200, response.content
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.country == "FR"
    # and no more than them: the researcher's act token may not
    _token, researcher_secret = make(cast.researcher, scope="act")
    assert bearer(researcher_secret).patch(url, {"country": "DE"}, format="json").status_code == 404


def test_a_session_still_works_and_still_needs_csrf(cast):
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(cast.admin)
    assert client.get(LIST).status_code == 200
    refused = client.patch(f"/api/institutions/{cast.hospital_a.slug}/", {"country": "FR"})
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]


def test_the_schema_declares_the_bearer_scheme_and_no_basic():
    schema = SchemaGenerator().get_schema(request=None, public=True)
    schemes = schema["components"]["securitySchemes"]
    assert schemes["apiToken"]["type"] == "http"
    assert schemes["apiToken"]["scheme"] == "bearer"
    assert "basicAuth" not in schemes


# --- the service ----------------------------------------------------------------------------------


def test_every_token_expires_within_the_configured_maximum(cast, settings):
    settings.API_TOKEN_MAX_DAYS = 30
    with pytest.raises(ValidationError) as too_long:
        make(cast.researcher, days=31)
    assert "1 to 30 days" in str(too_long.value)
    with pytest.raises(ValidationError):
        make(cast.researcher, days=0)
    token, _secret = make(cast.researcher, days=30)
    assert token.expires_at - token.created_at == dt.timedelta(days=30)


def test_bad_input_says_what_is_wrong(cast):
    with pytest.raises(ValidationError) as scope:
        make(cast.researcher, scope="write")
    assert "Unknown scope 'write'" in str(scope.value)
    with pytest.raises(ValidationError) as name:
        make(cast.researcher, name="  ")
    assert "Name the token" in str(name.value)
    assert not APIToken.objects.exists()


def test_creating_and_revoking_are_ledger_entries(cast):
    token, _secret = make(cast.researcher, scope="act")
    api_token_revoke(acting_user=cast.researcher, token=token)
    created, revoked = LedgerEntry.objects.filter(
        event__in=[ledger_events.API_TOKEN_CREATED, ledger_events.API_TOKEN_REVOKED]
    ).order_by("seq")
    assert created.event == ledger_events.API_TOKEN_CREATED
    assert json.loads(created.payload_text)["scope"] == "act"
    assert revoked.event == ledger_events.API_TOKEN_REVOKED
    assert revoked.actor_id == cast.researcher.pk
    assert revoked.subject_id == str(token.pk)


def test_only_the_owner_revokes_a_token_and_only_once(cast):
    from consortium.core.errors import ConflictError, ServiceError

    token, _secret = make(cast.researcher)
    with pytest.raises(ServiceError, match="Only its owner"):
        api_token_revoke(acting_user=cast.admin, token=token)
    api_token_revoke(acting_user=cast.researcher, token=token)
    with pytest.raises(ConflictError, match="already revoked"):
        api_token_revoke(acting_user=cast.researcher, token=token)


def test_the_command_prints_a_working_token_once(cast):
    out, err = io.StringIO(), io.StringIO()
    call_command(
        "create_api_token", "--user", "researcher", "--scope", "read", "--days", "7",
        stdout=out, stderr=err,
    )  # fmt: skip
    secret = out.getvalue().strip()
    assert secret.startswith("flp_") and "\n" not in secret
    assert secret not in err.getvalue()
    assert bearer(secret).get(LIST).status_code == 200
    with pytest.raises(CommandError, match="--days: A token lives from 1 to 90 days"):
        call_command("create_api_token", "--user", "researcher", "--scope", "act", "--days", "91")
    with pytest.raises(CommandError, match="no account named 'nobody'"):
        call_command("create_api_token", "--user", "nobody", "--scope", "act", "--days", "1")


# --- the pages ----------------------------------------------------------------------------------


def test_the_pages_need_a_signed_in_user():
    url = reverse("consortium:api-token-list")
    response = Client().get(url)
    assert response.status_code == 302
    assert response.url == f"{reverse('login')}?next={url}"


def test_a_user_lists_only_their_own_tokens(cast):
    mine, _ = make(cast.researcher, name="my notebook")
    theirs, _ = make(cast.admin, name="admin script")
    page = cast.client_for("researcher").get(reverse("consortium:api-token-list"))
    assert page.status_code == 200
    text = page.content.decode()
    assert "my notebook" in text and mine.token_prefix in text
    assert "admin script" not in text and theirs.token_prefix not in text


def test_creating_shows_the_secret_once(cast):
    client = cast.client_for("researcher")
    url = reverse("consortium:api-token-list")
    response = client.post(url, {"name": "analysis", "scope": "act", "days": "30"})
    assert response.status_code == 200
    assert response["Cache-Control"] == "no-store"
    token = APIToken.objects.get(user=cast.researcher)
    text = response.content.decode()
    secrets_shown = set(re.findall(r"flp_[A-Za-z0-9_-]+", text))
    assert len(secrets_shown) == 1
    secret = secrets_shown.pop()
    assert hashlib.sha256(secret.encode()).hexdigest() == token.token_hash
    assert "will not be shown again" in text
    assert token.scope == "act" and token.name == "analysis"
    # The list afterwards shows its prefix, never the secret again.
    again = client.get(url).content.decode()
    assert token.token_prefix in again and secret not in again


def test_the_form_refuses_a_lifetime_over_the_maximum(cast):
    client = cast.client_for("researcher")
    response = client.post(
        reverse("consortium:api-token-list"), {"name": "x", "scope": "read", "days": "365"}
    )
    assert response.status_code == 200
    assert "Select a valid choice" in response.content.decode()
    assert not APIToken.objects.exists()


def test_a_user_revokes_their_token_after_confirming(cast):
    token, secret = make(cast.researcher)
    client = cast.client_for("researcher")
    url = reverse("consortium:api-token-revoke", args=[token.pk])
    confirm = client.get(url)
    assert confirm.status_code == 200
    assert token.token_prefix in confirm.content.decode()
    token.refresh_from_db()
    assert token.revoked_at is None  # asking is not revoking
    response = client.post(url)
    assert response.status_code == 302
    assert response.url == reverse("consortium:api-token-list")
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert_refused(bearer(secret).get(LIST), "token_revoked")


def test_revoking_needs_the_csrf_token(cast):
    token, _secret = make(cast.researcher)
    client = Client(enforce_csrf_checks=True)
    client.force_login(cast.researcher)
    response = client.post(reverse("consortium:api-token-revoke", args=[token.pk]))
    assert response.status_code == 403
    token.refresh_from_db()
    assert token.revoked_at is None


@pytest.mark.parametrize("who", ["admin", "outsider", "auditor"])
def test_another_users_token_is_404(cast, who):
    token, secret = make(cast.researcher)
    client = cast.client_for(who)
    url = reverse("consortium:api-token-revoke", args=[token.pk])
    missing = reverse("consortium:api-token-revoke", args=[token.pk + 1000])
    assert client.get(url).status_code == 404
    assert client.post(url).status_code == 404
    assert client.get(missing).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None
    assert bearer(secret).get(LIST).status_code == 200


def test_the_user_menu_links_to_the_tokens_page(cast):
    page = cast.client_for("outsider").get(reverse("consortium:overview")).content.decode()
    assert f'href="{reverse("consortium:api-token-list")}"' in page


def test_the_list_shows_each_tokens_status(cast):
    active, _ = make(cast.researcher, name="live one")
    expired, _ = make(cast.researcher, name="old one")
    APIToken.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - dt.timedelta(days=1))
    revoked, _ = make(cast.researcher, name="gone one")
    api_token_revoke(acting_user=cast.researcher, token=revoked)
    text = cast.client_for("researcher").get(reverse("consortium:api-token-list")).content.decode()
    rows = {
        t.pk: text.split(f'id="api-token-{t.pk}"')[1].split("</tr>")[0]
        for t in (active, expired, revoked)
    }
    assert "badge ok" in rows[active.pk] and "Revoke" in rows[active.pk]
    assert "expired" in rows[expired.pk] and "Revoke" not in rows[expired.pk]
    assert "revoked" in rows[revoked.pk] and "Revoke" not in rows[revoked.pk]
