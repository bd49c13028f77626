"""A forgotten password is reset by email, and a signed-in user changes theirs (issue 14: the
product had neither; an administrator had to reset passwords by hand)."""

from __future__ import annotations

import re

import pytest
from django.core import mail
from django.test import Client

pytestmark = pytest.mark.django_db


def test_a_forgotten_password_is_reset_through_the_emailed_link(cast):
    user = cast.approver
    user.email = "approver@hospital-a.example"
    user.save(update_fields=["email"])
    client = Client()
    assert "Forgot your password?" in client.get("/accounts/login/").content.decode()
    response = client.post("/accounts/password/reset/", {"email": user.email}, follow=True)
    assert "Check your email" in response.content.decode()
    (message,) = mail.outbox
    assert message.to == [user.email]
    link = re.search(r"https?://[^/\s]+(/accounts/password/reset/\S+/)", message.body).group(1)
    form = client.get(link, follow=True)
    assert "Choose a new password" in form.content.decode()
    done = client.post(
        form.redirect_chain[-1][0] if form.redirect_chain else link,
        {"new_password1": "a-long-new-passphrase-26", "new_password2": "a-long-new-passphrase-26"},
        follow=True,
    )
    assert "Your password is changed" in done.content.decode()
    assert Client().login(username=user.username, password="a-long-new-passphrase-26")
    # The link works once.
    again = client.get(link, follow=True)
    assert "This link no longer works" in again.content.decode()


def test_an_unknown_address_gets_the_same_answer_and_no_email():
    response = Client().post(
        "/accounts/password/reset/", {"email": "nobody@nowhere.example"}, follow=True
    )
    assert response.status_code == 200
    assert "Check your email" in response.content.decode()
    assert mail.outbox == []


def test_a_signed_in_user_changes_their_password(cast):
    cast.auditor.set_password("the-old-one-2026")
    cast.auditor.save()
    client = Client()
    client.force_login(cast.auditor)
    assert client.get("/accounts/password/change/").status_code == 200
    done = client.post(
        "/accounts/password/change/",
        {
            "old_password": "the-old-one-2026",
            "new_password1": "the-new-passphrase-2026",
            "new_password2": "the-new-passphrase-2026",
        },
        follow=True,
    )
    assert "Your password is changed" in done.content.decode()
    assert Client().login(username="auditor", password="the-new-passphrase-2026")
    assert not Client().login(username="auditor", password="the-old-one-2026")
    # The session that changed it stays signed in (update_session_auth_hash).
    assert client.get("/accounts/password/change/").status_code == 200


def test_the_reset_link_is_built_from_site_url_not_the_requests_host(cast, settings):
    """Every link in mail comes from SITE_URL: a forged Host must not steer the reset token."""
    settings.SITE_URL = "https://consortium.example.org"
    settings.ALLOWED_HOSTS = ["consortium.example.org", "evil.example"]
    Client().post(
        "/accounts/password/reset/", {"email": cast.approver.email}, HTTP_HOST="evil.example"
    )
    (message,) = mail.outbox
    assert "https://consortium.example.org/accounts/password/reset/" in message.body
    assert "evil.example" not in message.body
    assert "for 3 days" in message.body


def test_changing_a_password_needs_the_old_one(cast):
    cast.auditor.set_password("the-old-one-2026")
    cast.auditor.save()
    client = Client()
    client.force_login(cast.auditor)
    response = client.post(
        "/accounts/password/change/",
        {
            "old_password": "wrong",
            "new_password1": "the-new-passphrase-2026",
            "new_password2": "the-new-passphrase-2026",
        },
    )
    assert response.status_code == 200
    assert "incorrectly" in response.content.decode()


def test_an_anonymous_visitor_cannot_change_a_password():
    response = Client().get("/accounts/password/change/")
    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]
