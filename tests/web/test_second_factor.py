"""The second factor (consortium.core.second_factor): setting up an authenticator app, backup
codes, verifying a session, and the acts that need it where ``TWO_FACTOR_REQUIRED``: an
approver's decision (page and API), an auditor's report export, API tokens made in a verified
session or not. With the setting off, nothing changes.

Codes are computed as an authenticator app does, from the device's key (RFC 6238)."""

from __future__ import annotations

import io
import re
import time

import pytest
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django_otp.oath import TOTP
from django_otp.plugins.otp_static.models import StaticToken
from django_otp.plugins.otp_totp.models import TOTPDevice
from rest_framework.test import APIClient

from audit.ledger import events as ledger_events
from consortium.core.second_factor import ACTS_NEEDING_SECOND_FACTOR
from consortium.governance.models import APIToken
from consortium.governance.services.second_factor import totp_confirm, totp_setup
from tests.support.job_api import agreement_and_datasets_in_force, decide_body, propose_logistic
from tests.support.ledger_checks import ledger_records
from training.models import Approval, JobState

pytestmark = pytest.mark.django_db

STATUS = "/account/two-factor/"
SETUP = "/account/two-factor/setup/"
VERIFY = "/account/two-factor/verify/"


def code_for(device: TOTPDevice, *, steps_ahead: int = 0) -> str:
    """The code the app shows ``steps_ahead`` 30-second steps from now. A code is accepted
    once: the next verification after a confirmation uses the next step's (within the one-step
    tolerance django-otp allows for clocks)."""
    device.refresh_from_db()
    totp = TOTP(device.bin_key, device.step, device.t0, device.digits, device.drift)
    totp.time = time.time() + steps_ahead * device.step
    return f"{totp.token():0{device.digits}d}"


def enrolled(user) -> TOTPDevice:
    """``user`` with a confirmed authenticator (through the service, as the setup page does)."""
    device = totp_setup(user)
    totp_confirm(user, device, code_for(device))
    device.refresh_from_db()
    return device


def signed_in(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def verify(client: Client, device: TOTPDevice, next_url: str = ""):
    return client.post(VERIFY, {"code": code_for(device, steps_ahead=1), "next": next_url})


@pytest.fixture
def required(settings):
    settings.TWO_FACTOR_REQUIRED = True
    return settings


@pytest.fixture
def job(cast):
    agreement_and_datasets_in_force(cast)
    return propose_logistic(cast)


def decision_data(job, institution) -> dict:
    return {
        "institution": institution.pk,
        "decision": "approved",
        "reason": "",
        "spec_digest": job.spec_digest,
        "agreement_version_id": job.agreement_version_id,
    }


# --- the acts ----------------------------------------------------------------------------------


def test_the_acts_are_registered_permissions():
    import rules

    assert all(rules.perm_exists(p) for p in ACTS_NEEDING_SECOND_FACTOR)
    assert "training.decide_job" in ACTS_NEEDING_SECOND_FACTOR
    assert "training.view_job" not in ACTS_NEEDING_SECOND_FACTOR


# --- setting up --------------------------------------------------------------------------------


def test_setup_shows_the_secret_and_confirms_only_with_a_right_code(cast, required):
    client = signed_in(cast.approver)
    page = client.get(SETUP)
    assert page.status_code == 200
    assert page["Cache-Control"] == "no-store"
    html = page.content.decode()
    assert 'src="data:image/svg+xml' in html
    secret = re.search(r'<pre class="mono" id="totp-secret">([A-Z2-7]+)</pre>', html).group(1)
    device = TOTPDevice.objects.get(user=cast.approver)
    assert not device.confirmed
    import base64

    assert base64.b32decode(secret + "=" * (-len(secret) % 8)) == device.bin_key
    # A reload shows the same secret (the same unconfirmed device).
    assert secret in client.get(SETUP).content.decode()
    assert TOTPDevice.objects.filter(user=cast.approver).count() == 1

    right = code_for(device)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    refused = client.post(SETUP, {"code": wrong})
    assert refused.status_code == 200
    assert "not the one your app shows now" in " ".join(refused.context["form"].errors["code"])
    device.refresh_from_db()
    assert not device.confirmed
    assert not StaticToken.objects.filter(device__user=cast.approver).exists()

    device.throttle_reset()  # the wrong code started django-otp's wait
    with ledger_records(ledger_events.SECOND_FACTOR_ENABLED):
        done = client.post(SETUP, {"code": right})
    assert done.status_code == 200
    assert done["Cache-Control"] == "no-store"
    device.refresh_from_db()
    assert device.confirmed
    codes = re.findall(r"<li>([a-z0-9]+)</li>", done.content.decode())
    assert len(codes) == 10 == len(set(codes))
    assert sorted(codes) == sorted(
        StaticToken.objects.filter(device__user=cast.approver).values_list("token", flat=True)
    )
    # The session that confirmed is verified.
    assert client.get(STATUS).context["verified"] is True
    # Set up once: the setup page now sends back to the status page.
    assert client.get(SETUP).url == STATUS


def test_backup_codes_work_once_each(cast, required):
    enrolled(cast.approver)
    codes = list(
        StaticToken.objects.filter(device__user=cast.approver).values_list("token", flat=True)
    )
    first = signed_in(cast.approver)
    ok = first.post(VERIFY, {"code": codes[0], "next": STATUS})
    assert ok.status_code == 302 and ok.url == STATUS
    assert first.get(STATUS).context["verified"] is True
    assert first.get(STATUS).context["backup_codes_left"] == 9

    again = signed_in(cast.approver)
    refused = again.post(VERIFY, {"code": codes[0]})
    assert refused.status_code == 200
    assert "Wrong code" in " ".join(refused.context["form"].errors["code"])
    assert again.get(STATUS).context["verified"] is False


def test_wrong_codes_are_throttled_with_a_clear_message(cast, required):
    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    right = code_for(device, steps_ahead=1)
    wrong = f"{(int(right) + 1) % 1_000_000:06d}"
    assert "Wrong code" in str(client.post(VERIFY, {"code": wrong}).context["form"].errors)
    # The right code right after a wrong one waits: django-otp's throttle (1 s, then doubling).
    waited = client.post(VERIFY, {"code": right})
    assert "Too many wrong codes in a row" in str(waited.context["form"].errors)
    assert client.get(STATUS).context["verified"] is False


def test_an_unsafe_next_is_ignored(cast, required):
    device = enrolled(cast.approver)
    response = verify(signed_in(cast.approver), device, "https://evil.example/")
    assert response.status_code == 302 and response.url == STATUS


# --- the acts that need it: pages --------------------------------------------------------------


def review_url(cast, job) -> str:
    return reverse("training:job-review", args=[cast.consortium.slug, job.pk])


def test_an_approver_without_a_second_factor_is_sent_to_set_one_up(cast, required, job):
    client = signed_in(cast.approver)
    review = review_url(cast, job)
    page = client.get(review)
    assert page.status_code == 302
    assert page.url.startswith(SETUP + "?next=")
    posted = client.post(review, decision_data(job, cast.hospital_a))
    assert posted.status_code == 302 and posted.url.startswith(SETUP)
    assert not Approval.objects.exists()
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL


def test_an_approver_decides_only_after_verifying(cast, required, job):
    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    review = review_url(cast, job)
    posted = client.post(review, decision_data(job, cast.hospital_a))
    assert posted.status_code == 302 and posted.url.startswith(VERIFY + "?next=")
    assert not Approval.objects.exists()
    message = [str(m) for m in client.get(STATUS).context["messages"]]
    assert any("needs your second factor" in m for m in message)

    back = verify(client, device, review)
    assert back.status_code == 302 and back.url == review
    assert client.get(review).status_code == 200
    decided = client.post(review, decision_data(job, cast.hospital_a))
    assert decided.status_code == 302
    assert Approval.objects.filter(job=job, institution=cast.hospital_a).count() == 1


def test_an_auditors_report_export_needs_the_second_factor(cast, required, job):
    report = reverse("audit:job-report", args=[cast.consortium.slug, job.pk])
    client = signed_in(cast.auditor)
    assert client.get(report).url.startswith(SETUP)
    device = enrolled(cast.auditor)
    assert client.get(report).url.startswith(VERIFY)
    verify(client, device)
    assert client.get(report).status_code == 200


def test_someone_who_may_not_act_still_gets_the_404(cast, required, job):
    # The rule is asked first: no redirect that would tell the job exists and is decidable.
    assert signed_in(cast.researcher).get(review_url(cast, job)).status_code == 404


def test_with_the_setting_off_nothing_changes(cast, settings, job):
    settings.TWO_FACTOR_REQUIRED = False
    client = signed_in(cast.approver)
    review = review_url(cast, job)
    assert client.get(review).status_code == 200
    assert client.post(review, decision_data(job, cast.hospital_a)).status_code == 302
    assert Approval.objects.filter(job=job).count() == 1
    status = client.get(STATUS).content.decode()
    assert "optional here" in status and "required in production" in status


# --- the acts that need it: the API ------------------------------------------------------------


def bearer(secret: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {secret}")
    return client


def make_token_in(client: Client, scope: str = "act"):
    response = client.post(
        reverse("consortium:api-token-list"), {"name": "notebook", "scope": scope, "days": 30}
    )
    return response, re.search(r"flp_[A-Za-z0-9_\-]+", response.content.decode())


def test_the_api_refuses_an_unverified_decision_saying_how(cast, required, job):
    session = APIClient()
    session.force_login(cast.approver)
    response = session.post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    assert response.status_code == 403
    body = response.json()
    assert body["code"] == "second_factor_required"
    assert VERIFY in body["detail"] and "create_api_token" in body["detail"]
    assert not Approval.objects.exists()


def test_an_act_token_needs_a_verified_session_and_carries_it(cast, required, job):
    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    refused, secret = make_token_in(client)
    assert secret is None
    assert "after verifying your second factor" in refused.content.decode()
    assert not APIToken.objects.exists()
    # A read token needs nothing more.
    _read, read_secret = make_token_in(client, "read")
    assert read_secret is not None

    verify(client, device)
    _made, secret = make_token_in(client)
    assert APIToken.objects.get(scope="act").second_factor is True
    response = bearer(secret.group(0)).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    assert response.status_code == 201, response.json()


def test_a_token_from_the_operators_command_cannot_do_the_acts(cast, required, job):
    out = io.StringIO()
    call_command(
        "create_api_token",
        "--user",
        "approver",
        "--scope",
        "act",
        "--days",
        "7",
        stdout=out,
        stderr=io.StringIO(),
    )
    token = APIToken.objects.get()
    assert token.second_factor is False
    response = bearer(out.getvalue().strip()).post(
        f"/api/jobs/{job.pk}/decide/", decide_body(job, cast.hospital_a), format="json"
    )
    assert response.status_code == 403
    assert response.json()["code"] == "second_factor_required"
    # It still reads.
    assert bearer(out.getvalue().strip()).get(f"/api/jobs/{job.pk}/").status_code == 200


# --- changing it -------------------------------------------------------------------------------


def test_new_backup_codes_and_removal_need_a_verified_session_and_the_password(cast, required):
    device = enrolled(cast.approver)
    cast.approver.set_password("correct horse 1")
    cast.approver.save()
    client = signed_in(cast.approver)
    remove = reverse("consortium:two-factor-remove")
    unverified = client.post(remove, {"password": "correct horse 1"})
    assert "Verify your second factor" in unverified.content.decode()
    assert TOTPDevice.objects.filter(user=cast.approver, confirmed=True).exists()

    verify(client, device)
    old = set(StaticToken.objects.values_list("token", flat=True))
    new = client.post(
        reverse("consortium:two-factor-backup-codes"), {"password": "correct horse 1"}
    )
    assert new["Cache-Control"] == "no-store"
    shown = set(re.findall(r"<li>([a-z0-9]+)</li>", new.content.decode()))
    assert len(shown) == 10 and not shown & old
    assert shown == set(StaticToken.objects.values_list("token", flat=True))

    wrong = client.post(remove, {"password": "wrong"})
    assert "not your current password" in str(wrong.context["form"].errors)
    with ledger_records(ledger_events.SECOND_FACTOR_REMOVED):
        gone = client.post(remove, {"password": "correct horse 1"})
    assert gone.status_code == 302
    assert not TOTPDevice.objects.filter(user=cast.approver).exists()
    assert not StaticToken.objects.exists()
    # The session's verification went with the device.
    assert client.get(STATUS).context["verified"] is False


def test_the_schema_declares_the_403_on_the_acts_only(tmp_path):
    import yaml

    target = tmp_path / "schema.yaml"
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(target))
    paths = yaml.safe_load(target.read_text())["paths"]
    decide = paths["/api/jobs/{id}/decide/"]["post"]["responses"]
    assert decide["403"]["content"]["application/json"]["schema"]["$ref"].endswith("/Error")
    assert "second_factor_required" in decide["403"]["description"]
    sign = paths["/api/agreement-versions/{id}/sign/"]["post"]["responses"]
    assert "second_factor_required" in sign["403"]["description"]
    # Every operation can answer 403 (roles, CSRF), but only the acts speak of a second factor.
    assert "second" not in paths["/api/consortia/"]["get"]["responses"]["403"]["description"]


def test_signing_out_ends_the_verification(cast, required):
    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    verify(client, device)
    assert client.get(STATUS).context["verified"] is True
    client.post(reverse("logout"))
    client.force_login(cast.approver)
    assert client.get(STATUS).context["verified"] is False


def test_signing_needs_it_too_and_a_verified_token_signs(cast, required):
    from tests.support.agreements import publish_agreement

    version = publish_agreement(cast)
    body = {
        "institution": cast.hospital_a.slug,
        "typed_name": cast.approver.get_full_name(),
        "confirmed": True,
        "content_digest": version.content_digest,
    }
    sign = f"/api/agreement-versions/{version.pk}/sign/"
    out = io.StringIO()
    call_command("create_api_token", "--user", "approver", "--scope", "act", "--days", "7",
                 stdout=out, stderr=io.StringIO())  # fmt: skip
    refused = bearer(out.getvalue().strip()).post(sign, body, format="json")
    assert refused.status_code == 403 and refused.json()["code"] == "second_factor_required"
    assert not version.signatures.exists()

    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    verify(client, device)
    _made, secret = make_token_in(client)
    assert bearer(secret.group(0)).post(sign, body, format="json").status_code == 201


def test_the_compliance_report_reads_without_it_but_exports_only_with_it(cast, required):
    from audit.models import LedgerEntry
    from audit.reports.scope import ledger_head
    from tests.reports.test_compliance_report import plant_history

    history = plant_history(cast)
    version = history.version
    report = reverse(
        "audit:compliance-report", args=[cast.consortium.slug, version.agreement_id, version.number]
    )
    client = signed_in(cast.auditor)
    assert client.get(report).status_code == 200  # reading the ledger needs no second factor
    export = {"format": "csv", "head": str(ledger_head().seq)}
    refused = client.post(report, export)
    assert refused.status_code == 302 and refused.url.startswith(SETUP)
    assert not LedgerEntry.objects.filter(event="report.compliance_exported").exists()
    device = enrolled(cast.auditor)
    verify(client, device)
    assert client.post(report, export).status_code == 200
    assert LedgerEntry.objects.filter(event="report.compliance_exported").count() == 1


def test_the_tokens_page_says_what_an_act_token_needs(cast, required):
    device = enrolled(cast.approver)
    client = signed_in(cast.approver)
    page = client.get(reverse("consortium:api-token-list")).content.decode()
    assert "needs a session that has verified its second factor" in page
    assert f"{VERIFY}?next=/accounts/api-tokens/" in page
    verify(client, device)
    page = client.get(reverse("consortium:api-token-list")).content.decode()
    assert "This session has verified its second factor" in page


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "False"), ({"TWO_FACTOR_REQUIRED": "true"}, "True"), ("production", "True"),
     ("production-off", "False")],
)  # fmt: skip
def test_required_by_default_in_production_only(env, expected):
    import os
    import subprocess
    import sys

    from tests.web.test_settings import PRODUCTION, ROOT

    if env == "production":
        env = {**PRODUCTION, "EMAIL_URL": "smtp://smtp.example.org:25"}
    elif env == "production-off":
        env = {**PRODUCTION, "EMAIL_URL": "smtp://smtp.example.org:25", "TWO_FACTOR_REQUIRED": "0"}
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "CONSORTIUM_", "TWO_FACTOR"))
        and k not in ("DATABASE_URL", "EMAIL_URL", "SITE_URL")
    }
    result = subprocess.run(
        [sys.executable, "-c", "import consortium.settings as s; print(s.TWO_FACTOR_REQUIRED)"],
        cwd=ROOT,
        env={**clean, **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected
