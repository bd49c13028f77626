"""Failed sign-ins lock an account and, at a higher limit, a client address; the client's
address is read from X-Forwarded-For only when a trusted proxy sent it (issue 16, item 5: by
address alone, behind the reverse proxy or a hospital's NAT ten bad passwords from anyone
locked out everyone, while guesses at one account from many addresses were never limited)."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from asgiref.sync import async_to_sync
from axes.models import AccessAttempt
from django.core import mail
from django.db.models import Sum
from django.test import AsyncClient, Client, RequestFactory
from django.utils import timezone

from consortium.core.lockout import client_ip_address
from tests.support.factories import PASSWORD, UserFactory
from tests.web.test_settings import load_settings

pytestmark = pytest.mark.django_db

LOGIN = "/accounts/login/"
PROXY = "127.0.0.1"


@pytest.fixture(autouse=True)
def _lockout_on(settings):
    """The lockout as production runs it (tests/conftest.py switches it off elsewhere), with
    the shipped limits written out so that the tests say what they rely on."""
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 10
    settings.AXES_ADDRESS_FAILURE_LIMIT = 50
    settings.AXES_COOLOFF_TIME = 0.25
    settings.TRUSTED_PROXIES = []


def sign_in(username, password, *, peer="192.0.2.1", forwarded=None, **headers):
    extra = {"REMOTE_ADDR": peer, **headers}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    return Client().post(LOGIN, {"username": username, "password": password}, **extra)


def signed_in(response) -> bool:
    return response.status_code == 302 and LOGIN not in response["Location"]


def words(response) -> str:
    return " ".join(response.content.decode().split())


def failures(**lookup) -> int:
    return AccessAttempt.objects.filter(**lookup).aggregate(n=Sum("failures_since_start"))["n"] or 0


def test_guesses_at_one_account_from_ten_addresses_lock_that_account_only():
    victim = UserFactory(username="victim")
    bystander = UserFactory(username="bystander")
    for i in range(9):
        assert sign_in("victim", "wrong", peer=f"198.51.100.{i}").status_code == 200
    tenth = sign_in("victim", "wrong", peer="198.51.100.9")
    assert tenth.status_code == 429
    # Locked wherever the next attempt comes from, the right password included.
    refused = sign_in(victim.username, PASSWORD, peer="203.0.113.200")
    assert refused.status_code == 429
    assert "tried for this account, so it is locked until" in words(refused)
    # Nobody else is: not from the victim's address, not from the guessers'.
    assert signed_in(sign_in(bystander.username, PASSWORD, peer="203.0.113.200"))
    assert signed_in(sign_in(bystander.username, PASSWORD, peer="198.51.100.9"))


def test_failures_for_many_accounts_through_the_proxy_lock_out_no_one_else(settings):
    """Behind the proxy every request comes from 127.0.0.1: each client is counted by the
    address the proxy forwarded, so others' mistakes lock nobody else out."""
    settings.TRUSTED_PROXIES = [PROXY]
    approver = UserFactory(username="approver")
    for i in range(30):
        response = sign_in(f"nurse{i % 6}", "wrong", peer=PROXY, forwarded=f"203.0.113.{i}")
        assert response.status_code == 200, i
    assert failures(ip_address=PROXY) == 0
    assert signed_in(sign_in(approver.username, PASSWORD, peer=PROXY, forwarded="198.51.100.7"))


def test_one_forwarded_client_guessing_at_many_accounts_locks_that_client_only(settings):
    settings.TRUSTED_PROXIES = [PROXY]
    settings.AXES_ADDRESS_FAILURE_LIMIT = 20
    approver = UserFactory(username="approver")
    for i in range(19):
        assert sign_in(f"user{i}", "wrong", peer=PROXY, forwarded="203.0.113.66").status_code == 200
    assert sign_in("user19", "wrong", peer=PROXY, forwarded="203.0.113.66").status_code == 429
    # The address is locked, for any account, even with the right password ...
    refused = sign_in(approver.username, PASSWORD, peer=PROXY, forwarded="203.0.113.66")
    assert refused.status_code == 429
    assert "tried from your network address" in words(refused)
    # ... and only that address: the same account signs in from anywhere else.
    assert signed_in(sign_in(approver.username, PASSWORD, peer=PROXY, forwarded="203.0.113.67"))


def test_a_forged_forwarded_address_from_an_untrusted_peer_is_ignored(settings):
    settings.TRUSTED_PROXIES = [PROXY]
    settings.AXES_ADDRESS_FAILURE_LIMIT = 20
    approver = UserFactory(username="approver")
    for i in range(20):
        sign_in(f"user{i}", "wrong", peer="198.51.100.66", forwarded=f"10.0.0.{i}")
    # Every failure was counted against the peer, whatever it claimed to forward ...
    assert failures(ip_address="198.51.100.66") == 20
    assert failures(ip_address__startswith="10.0.0.") == 0
    refused = sign_in(approver.username, PASSWORD, peer="198.51.100.66", forwarded="10.9.9.9")
    assert refused.status_code == 429
    # ... and an entry the client wrote in front of what the proxy appended counts for nothing.
    sign_in("user0", "wrong", peer=PROXY, forwarded="198.51.100.1, 203.0.113.5")
    assert failures(ip_address="203.0.113.5") == 1
    assert failures(ip_address="198.51.100.1") == 0


@pytest.mark.parametrize(
    ("trusted", "peer", "forwarded", "client"),
    [
        ([], "127.0.0.1", "203.0.113.5", "127.0.0.1"),  # no trusted proxy: header never read
        (["127.0.0.1"], "198.51.100.2", "203.0.113.5", "198.51.100.2"),  # untrusted peer
        (["127.0.0.1"], "127.0.0.1", None, "127.0.0.1"),  # trusted, nothing forwarded
        (["127.0.0.1"], "127.0.0.1", "10.1.1.1, 203.0.113.5", "203.0.113.5"),  # forged left
        # A load balancer in front of nginx: both trusted, the client is the next hop out.
        (["127.0.0.1", "10.0.0.0/8"], "127.0.0.1", "203.0.113.5, 10.2.3.4", "203.0.113.5"),
        (["127.0.0.1"], "127.0.0.1", "203.0.113.5:4711", "203.0.113.5"),  # with a port
        (["::1"], "::1", "[2001:db8::7]:443", "2001:db8::7"),
        (["127.0.0.1"], "127.0.0.1", "::ffff:203.0.113.5", "203.0.113.5"),  # one client, once
        (["127.0.0.1"], "127.0.0.1", "not-an-address", "127.0.0.1"),
    ],
)
def test_the_client_address(settings, trusted, peer, forwarded, client):
    settings.TRUSTED_PROXIES = trusted
    extra = {"REMOTE_ADDR": peer}
    if forwarded is not None:
        extra["HTTP_X_FORWARDED_FOR"] = forwarded
    assert client_ip_address(RequestFactory().get("/", **extra)) == client


def test_the_lock_says_what_is_locked_and_until_when():
    UserFactory(username="victim")
    for i in range(10):
        sign_in("victim", "wrong", peer=f"198.51.100.{i}")
    # The first failure five minutes ago, the others one minute ago: the lock opens when the
    # first ages out of the 15-minute window (nine are then left), ten minutes from now.
    now = timezone.now()
    AccessAttempt.objects.update(attempt_time=now - timedelta(minutes=1))
    AccessAttempt.objects.filter(ip_address="198.51.100.0").update(
        attempt_time=now - timedelta(minutes=5)
    )
    until = now + timedelta(minutes=10)
    page = sign_in("victim", PASSWORD)
    assert page.status_code == 429
    text = words(page)
    assert until.strftime("%Y-%m-%d %H:%M UTC") in text
    assert "(about 10 minutes)" in text
    assert "Reset your password by email" in text
    assert 595 <= int(page["Retry-After"]) <= 600
    data = sign_in("victim", PASSWORD, HTTP_ACCEPT="application/json").json()
    assert data["locked"] == "account"
    assert data["code"] == "locked_out"
    assert data["until"] == until.isoformat()
    assert "locked until" in data["detail"]


def test_attempts_while_locked_do_not_extend_the_lock_and_it_ends_after_the_cool_off():
    victim = UserFactory(username="victim")
    for i in range(10):
        sign_in("victim", "wrong", peer=f"198.51.100.{i}")
    for _ in range(5):
        assert sign_in("victim", "wrong", peer="198.51.100.99").status_code == 429
    assert failures(username="victim") == 10  # the five while locked were not counted
    # Fifteen minutes after the last counted failure the account opens again.
    AccessAttempt.objects.update(
        attempt_time=AccessAttempt.objects.latest("attempt_time").attempt_time
        - timedelta(minutes=15, seconds=1)
    )
    assert signed_in(sign_in(victim.username, PASSWORD, peer="198.51.100.99"))


def test_signing_in_to_ones_own_account_does_not_wipe_guesses_at_another():
    """axes' own reset on success deletes every failure from the signing-in address, so an
    attacker with an account could guess at someone else's for ever, 9 at a time."""
    attacker = UserFactory(username="attacker")
    UserFactory(username="victim")
    for _ in range(9):
        sign_in("victim", "wrong", peer="198.51.100.66")
    assert signed_in(sign_in(attacker.username, PASSWORD, peer="198.51.100.66"))
    assert sign_in("victim", "wrong", peer="198.51.100.66").status_code == 429


def test_a_password_reset_by_email_lifts_the_accounts_lock():
    victim = UserFactory(username="victim", email="victim@hospital-a.example")
    for i in range(10):
        sign_in("victim", "wrong", peer=f"198.51.100.{i}")
    assert sign_in(victim.username, PASSWORD).status_code == 429
    client = Client()
    client.post("/accounts/password/reset/", {"email": victim.email})
    (message,) = mail.outbox
    link = re.search(r"http://127\.0\.0\.1:8000(/accounts/password/reset/\S+/)", message.body)
    form = client.get(link.group(1), follow=True)
    client.post(
        form.redirect_chain[-1][0],
        {"new_password1": "a-long-new-passphrase-26", "new_password2": "a-long-new-passphrase-26"},
    )
    assert signed_in(sign_in(victim.username, "a-long-new-passphrase-26"))


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TRUSTED_PROXIES": "127.0.0.1,nginx"}, "TRUSTED_PROXIES: 'nginx' is not an IP"),
        ({"AXES_FAILURE_LIMIT": "0"}, "AXES_FAILURE_LIMIT (0) must be at least 1"),
        ({"AXES_ADDRESS_FAILURE_LIMIT": "5"}, "AXES_ADDRESS_FAILURE_LIMIT (5) at least"),
        ({"AXES_COOLOFF_HOURS": "0"}, "AXES_COOLOFF_HOURS must be more than 0"),
    ],
)
def test_lockout_settings_are_refused_when_they_make_no_sense(env, message):
    result = load_settings(**env)
    assert result.returncode != 0
    assert message in result.stderr


def test_trusted_proxies_as_networks_are_accepted():
    result = load_settings(TRUSTED_PROXIES="127.0.0.1, 10.0.0.0/8, ::1")
    assert result.returncode == 0, result.stderr


def test_the_lock_page_under_asgi():
    """Production serves through Daphne (ASGI), where axes' middleware takes its async path,
    which hands the lockout callable its arguments in another order."""
    UserFactory(username="victim")
    for i in range(10):
        sign_in("victim", "wrong", peer=f"198.51.100.{i}")
    client = AsyncClient()
    post = async_to_sync(client.post)
    page = post(LOGIN, {"username": "victim", "password": PASSWORD})
    assert page.status_code == 429
    assert "tried for this account, so it is locked until" in words(page)
    data = post(
        LOGIN, {"username": "victim", "password": PASSWORD}, headers={"Accept": "application/json"}
    ).json()
    assert data["locked"] == "account"
