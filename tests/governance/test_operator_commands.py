"""The operator's management commands: ``create_consortium``, ``add_institution``,
``invite_member`` and ``create_site_credentials``.

Each command is checked against the web page it stands for: both are run, and the ledger
entries they write are compared field by field (event, actor, subject, scope, payload keys),
so a command cannot drift from its page. The links and the token they print work, and every
refusal is a CommandError that says what is wrong and leaves the ledger untouched.
"""

from __future__ import annotations

import json
import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse

from audit.ledger import events as ledger_events
from audit.models import LedgerEntry
from consortium.governance.models import Consortium, Institution, Invitation, Membership, Role
from consortium.governance.services.institutions import key_fingerprint
from tests.support.keys import ed25519_pem, rsa_pem
from tests.support.ledger_checks import LedgerWatch, ledger_records
from training.models import SiteCredential
from training.rounds.credentials import site_credential_authenticate

pytestmark = pytest.mark.django_db

User = get_user_model()
STRONG_PASSWORD = "quartz-lantern-meadow-91"


def run(name: str, *args: str) -> tuple[str, str]:
    """Run ``manage.py name args`` in this process: (stdout, stderr)."""
    out, err = StringIO(), StringIO()
    call_command(name, *args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def refused(name: str, *args: str) -> str:
    """Run a command that must be refused: its message (and nothing in the ledger)."""
    watch = LedgerWatch()
    with pytest.raises(CommandError) as caught:
        run(name, *args)
    watch.assert_none()
    return str(caught.value)


def entry_shape(entry: LedgerEntry) -> dict:
    """What a command and its page must write alike (not the ids or values that differ)."""
    return {
        "event": entry.event,
        "actor_id": entry.actor_id,
        "actor_repr": entry.actor_repr,
        "subject_type": entry.subject_type,
        "consortium_slug": entry.consortium_slug,
        "institution_slug": bool(entry.institution_slug),
        "payload_keys": sorted(json.loads(entry.payload_text)),
    }


@pytest.fixture
def operator(db):
    return User.objects.create_superuser("operator", "ops@example.org", STRONG_PASSWORD)


@pytest.fixture
def mail_now(django_capture_on_commit_callbacks):
    """Run the on-commit callbacks (the invitation mail) of the block, as a real commit does."""
    return lambda: django_capture_on_commit_callbacks(execute=True)


# --- create_consortium ---------------------------------------------------------------------


def test_create_consortium_invites_its_first_administrator(
    operator, mailoutbox, mail_now, settings, client
):
    settings.SITE_URL = "https://central.example.org"
    invited = (ledger_events.CONSORTIUM_CREATED, ledger_events.MEMBER_INVITED)
    with ledger_records(*invited), mail_now():
        link, err = run(
            "create_consortium",
            "--slug=lfoc",
            "--name=London Oncology",
            "--admin-email=A.Morgan@Example.org",
            "--actor=operator",
        )
    consortium = Consortium.objects.get(slug="lfoc")
    assert consortium.name == "London Oncology"
    # The operator acted, and is a member of nothing.
    created, invited = LedgerEntry.objects.order_by("-seq")[:2][::-1]
    assert created.actor_id == invited.actor_id == operator.pk
    assert created.consortium_slug == invited.consortium_slug == "lfoc"
    assert json.loads(invited.payload_text)["role"] == Role.CONSORTIUM_ADMIN
    assert not Membership.objects.filter(user=operator).exists()
    # One line on stdout: the one-time link, on SITE_URL; the same link was mailed.
    assert re.fullmatch(r"https://central\.example\.org/invitations/[^/\s]+/", link), link
    assert "a.morgan@example.org is invited" in err and "works once" in err
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["a.morgan@example.org"]
    assert link in mailoutbox[0].body
    # The link works: the invitee creates an account and administers the consortium.
    path = link.removeprefix(settings.SITE_URL)
    joined = client.post(
        path,
        {
            "username": "amorgan",
            "full_name": "Alex Morgan",
            "password": STRONG_PASSWORD,
            "password_confirm": STRONG_PASSWORD,
        },
    )
    assert joined.status_code == 302
    admin = User.objects.get(username="amorgan")
    assert Membership.objects.filter(
        user=admin, consortium=consortium, role=Role.CONSORTIUM_ADMIN
    ).exists()
    assert client.get(reverse("consortium:institution-create", args=["lfoc"])).status_code == 200
    # Once.
    assert client.get(path).status_code == 410


def test_create_consortium_appoints_an_existing_account(operator, mailoutbox, settings):
    settings.SITE_URL = "http://127.0.0.1:8101"
    User.objects.create_user("amorgan", "a.morgan@example.org", STRONG_PASSWORD)
    with ledger_records(ledger_events.CONSORTIUM_CREATED, ledger_events.MEMBER_JOINED):
        link, err = run(
            "create_consortium",
            "--slug=lfoc",
            "--name=London Oncology",
            "--admin-email=a.morgan@example.org",
            "--admin-username=amorgan",
            "--actor=operator",
        )
    joined = LedgerEntry.objects.order_by("-seq").first()
    assert joined.actor_id == operator.pk
    assert json.loads(joined.payload_text) | {"user_id": 0} == {
        "user_id": 0,
        "username": "amorgan",
        "role": Role.CONSORTIUM_ADMIN,
        "via": "operator",
    }
    assert link == "http://127.0.0.1:8101/accounts/login/?next=/consortia/lfoc/"
    assert "amorgan is its administrator" in err
    assert not Invitation.objects.exists() and not mailoutbox


def test_create_consortium_refusals(cast, operator):
    args = ["--name=X", "--admin-email=x@example.org", "--actor=operator"]
    # Only a superuser starts a consortium: not even another consortium's administrator.
    message = refused("create_consortium", "--slug=x", *args[:-1], "--actor=admin")
    assert "Only a superuser" in message and "admin is not one" in message
    assert "no account named 'ghost'" in refused(
        "create_consortium", "--slug=x", *args[:-1], "--actor=ghost"
    )
    assert "already exists" in refused("create_consortium", f"--slug={cast.consortium.slug}", *args)
    assert "--slug: 'new' is reserved" in refused("create_consortium", "--slug=new", *args)
    assert "--slug: Use at most 64 characters." in refused(
        "create_consortium", "--slug=" + "s" * 65, *args
    )
    assert "--slug: 'no spaces' is not a slug" in refused(
        "create_consortium", "--slug=no spaces", *args
    )
    assert "--admin-email: 'not-an-address' is not an email address" in refused(
        "create_consortium",
        "--slug=x",
        "--name=X",
        "--admin-email=not-an-address",
        "--actor=operator",
    )
    assert "--admin-username: There is no account named 'nobody'" in refused(
        "create_consortium", "--slug=x", *args, "--admin-username=nobody"
    )
    # The named account must be the one with that address.
    assert "has the email address outsider@example.org, not x@example.org" in refused(
        "create_consortium", "--slug=x", *args, "--admin-username=outsider"
    )
    assert not Consortium.objects.filter(slug__in=["x", "new"]).exists()


def test_the_operator_page_and_the_command_write_the_same_entries(
    operator, mail_now, mailoutbox, client
):
    client.force_login(operator)
    with mail_now():
        page = client.post(
            reverse("consortium:consortium-start"),
            {"name": "By page", "slug": "by-page", "admin_email": "p@example.org"},
        )
    assert page.status_code == 200
    by_page = list(LedgerEntry.objects.filter(consortium_slug="by-page").order_by("seq"))
    with mail_now():
        run(
            "create_consortium",
            "--slug=by-command",
            "--name=By command",
            "--admin-email=c@example.org",
            "--actor=operator",
        )
    by_command = list(LedgerEntry.objects.filter(consortium_slug="by-command").order_by("seq"))
    assert [entry_shape(e) | {"consortium_slug": ""} for e in by_page] == [
        entry_shape(e) | {"consortium_slug": ""} for e in by_command
    ]
    assert [e.event for e in by_command] == ["consortium.created", "member.invited"]
    assert len(mailoutbox) == 2


# --- add_institution -----------------------------------------------------------------------


def test_add_institution_writes_what_the_page_writes(cast, tmp_path):
    client = cast.client_for("admin")
    url = reverse("consortium:institution-create", args=[cast.consortium.slug])
    with ledger_records(ledger_events.INSTITUTION_CREATED):
        client.post(url, {"name": "By Page", "slug": "by-page", "worker_public_key": ed25519_pem()})
    by_page = LedgerEntry.objects.order_by("-seq").first()

    key_file = tmp_path / "worker.pub.pem"
    key_file.write_text(ed25519_pem())
    with ledger_records(ledger_events.INSTITUTION_CREATED):
        out, _ = run(
            "add_institution",
            f"--consortium={cast.consortium.slug}",
            "--slug=barts",
            "--name=Barts Hospital",
            "--country=GB",
            f"--worker-public-key={key_file}",
            "--actor=admin",
        )
    by_command = LedgerEntry.objects.order_by("-seq").first()
    assert entry_shape(by_command) == entry_shape(by_page)
    assert by_command.actor_id == cast.admin.pk and by_command.institution_slug == "barts"
    institution = Institution.objects.get(slug="barts")
    assert (institution.consortium, institution.name, institution.country) == (
        cast.consortium,
        "Barts Hospital",
        "GB",
    )
    assert json.loads(by_command.payload_text)["worker_key_fingerprint"] == key_fingerprint(
        institution.worker_public_key
    )
    assert "queue is site.barts" in out


def test_add_institution_takes_the_key_as_text(cast):
    pem = ed25519_pem()
    run(
        "add_institution",
        f"--consortium={cast.consortium.slug}",
        "--slug=kings",
        "--name=King's",
        f"--worker-public-key={pem}",
        "--actor=admin",
    )
    entry = LedgerEntry.objects.order_by("-seq").first()
    assert (entry.event, entry.actor_id) == ("institution.created", cast.admin.pk)
    assert Institution.objects.get(slug="kings").worker_public_key == pem.strip()


def test_add_institution_refusals(cast, tmp_path):
    slug = f"--consortium={cast.consortium.slug}"
    assert "there is no consortium with the slug 'nope' (known: test-consortium)" in refused(
        "add_institution", "--consortium=nope", "--slug=c", "--name=C", "--actor=admin"
    )
    assert "already exists" in refused(
        "add_institution", slug, f"--slug={cast.hospital_a.slug}", "--name=C", "--actor=admin"
    )
    # What the page asks: a researcher, an approver or an institution's admin may not.
    for who in ("approver", "inst_admin", "outsider"):
        message = refused("add_institution", slug, "--slug=c", "--name=C", f"--actor={who}")
        assert f"{who} may not add institutions to test-consortium" in message
        assert "only its consortium administrators may" in message
    assert "--worker-public-key: The worker key must be an Ed25519 public key" in refused(
        "add_institution",
        slug,
        "--slug=c",
        "--name=C",
        f"--worker-public-key={rsa_pem()}",
        "--actor=admin",
    )
    assert f"--worker-public-key: no file {tmp_path / 'missing.pem'}" in refused(
        "add_institution",
        slug,
        "--slug=c",
        "--name=C",
        f"--worker-public-key={tmp_path / 'missing.pem'}",
        "--actor=admin",
    )
    assert not Institution.objects.filter(slug="c").exists()


# --- invite_member -------------------------------------------------------------------------


def test_invite_member_writes_what_the_page_writes(cast, mail_now, mailoutbox, settings):
    settings.SITE_URL = "https://central.example.org"
    with mail_now(), ledger_records(ledger_events.MEMBER_INVITED):
        cast.client_for("admin").post(
            reverse("consortium:member-invite", args=[cast.consortium.slug]),
            {"email": "p@example.org", "role": Role.APPROVER, "institution": cast.hospital_b.pk},
        )
    by_page = LedgerEntry.objects.order_by("-seq").first()
    with mail_now(), ledger_records(ledger_events.MEMBER_INVITED):
        link, err = run(
            "invite_member",
            f"--consortium={cast.consortium.slug}",
            f"--institution={cast.hospital_b.slug}",
            "--email=c@example.org",
            f"--role={Role.APPROVER}",
            "--actor=admin",
        )
    by_command = LedgerEntry.objects.order_by("-seq").first()
    assert entry_shape(by_command) == entry_shape(by_page)
    assert by_command.institution_slug == by_page.institution_slug == cast.hospital_b.slug
    invitation = Invitation.objects.get(email="c@example.org")
    assert (invitation.role, invitation.institution, invitation.invited_by) == (
        Role.APPROVER,
        cast.hospital_b,
        cast.admin,
    )
    assert "c@example.org is invited as Approver at Hospital B" in err
    assert link.startswith("https://central.example.org/invitations/")
    assert [m.to for m in mailoutbox] == [["p@example.org"], ["c@example.org"]]
    assert link in mailoutbox[1].body
    page = cast.client_for("anonymous").get(link.removeprefix(settings.SITE_URL))
    assert page.status_code == 200 and "c@example.org" in page.content.decode()


def test_invite_member_to_a_consortium_role_and_by_an_institution_admin(cast):
    link, _ = run(
        "invite_member",
        f"--consortium={cast.consortium.slug}",
        "--email=auditor2@example.org",
        "--role=auditor",
        "--actor=admin",
    )
    assert "/invitations/" in link
    assert Invitation.objects.get(email="auditor2@example.org").institution is None
    # An institution's administrator invites to their own institution, as on the page...
    run(
        "invite_member",
        f"--consortium={cast.consortium.slug}",
        f"--institution={cast.hospital_a.slug}",
        "--email=steward2@example.org",
        "--role=data_steward",
        "--actor=inst_admin",
    )
    assert LedgerEntry.objects.order_by("-seq").first().actor_id == cast.inst_admin.pk


def test_invite_member_refusals(cast):
    c = f"--consortium={cast.consortium.slug}"
    a = f"--institution={cast.hospital_a.slug}"
    message = refused(
        "invite_member", c, a, "--email=x@example.org", "--role=boss", "--actor=admin"
    )
    assert "--role: unknown role 'boss'; choose one of consortium_admin, auditor" in message
    assert "--institution: Approver belongs to an institution: choose one." in refused(
        "invite_member", c, "--email=x@example.org", "--role=approver", "--actor=admin"
    )
    assert "--role: Auditor is a consortium-wide role" in refused(
        "invite_member", c, a, "--email=x@example.org", "--role=auditor", "--actor=admin"
    )
    assert "no institution with the slug 'nope' in test-consortium" in refused(
        "invite_member",
        c,
        "--institution=nope",
        "--email=x@example.org",
        "--role=approver",
        "--actor=admin",
    )
    assert "--email: 'not an address' is not an email address" in refused(
        "invite_member", c, a, "--email=not an address", "--role=approver", "--actor=admin"
    )
    # ...but neither to another institution nor to a consortium-wide role.
    assert "inst_admin may not invite people to hospital-b" in refused(
        "invite_member",
        c,
        f"--institution={cast.hospital_b.slug}",
        "--email=x@example.org",
        "--role=approver",
        "--actor=inst_admin",
    )
    assert "inst_admin may not invite people to consortium-wide roles" in refused(
        "invite_member", c, "--email=x@example.org", "--role=auditor", "--actor=inst_admin"
    )
    assert "approver may not" in refused(
        "invite_member", c, a, "--email=x@example.org", "--role=researcher", "--actor=approver"
    )
    assert not Invitation.objects.exists()


# --- create_site_credentials ---------------------------------------------------------------


def test_create_site_credentials_writes_what_the_page_writes(cast, tmp_path, settings):
    settings.SITE_URL = "https://central.example.org"
    page_url = reverse(
        "training:credential-list", args=[cast.consortium.slug, cast.hospital_a.slug]
    )
    with ledger_records(ledger_events.CREDENTIAL_CREATED):
        cast.client_for("steward").post(page_url, {"label": "by-page", "public_key": ed25519_pem()})
    by_page = LedgerEntry.objects.order_by("-seq").first()

    pem = ed25519_pem()
    key_file = tmp_path / "barts.pub.pem"
    key_file.write_text(pem)
    with ledger_records(ledger_events.CREDENTIAL_CREATED):
        token, err = run(
            "create_site_credentials",
            f"--institution={cast.hospital_a.slug}",
            f"--public-key={key_file}",
            "--label=gpu-node-1",
            "--actor=steward",
        )
    by_command = LedgerEntry.objects.order_by("-seq").first()
    assert entry_shape(by_command) == entry_shape(by_page)
    credential = SiteCredential.objects.get(label="gpu-node-1")
    assert credential.created_by == cast.steward and credential.public_key == pem.strip()
    # Printed once, alone; it authenticates as the site; only its hash is kept.
    assert site_credential_authenticate(token) == credential
    assert token not in json.dumps(json.loads(by_command.payload_text))
    assert "SITE_SLUG=hospital-a" in err and "CENTRAL_URL=https://central.example.org" in err
    assert f"key {key_fingerprint(pem.strip())}" in err


def test_create_site_credentials_takes_pem_text_and_an_institution_admin_may(cast):
    token, _ = run(
        "create_site_credentials",
        f"--institution={cast.hospital_a.slug}",
        f"--public-key={ed25519_pem()}",
        "--actor=inst_admin",
    )
    credential = site_credential_authenticate(token)
    assert credential.institution == cast.hospital_a and credential.label == "site-worker"
    assert LedgerEntry.objects.order_by("-seq").first().actor_id == cast.inst_admin.pk


# --- the operator: starts consortia, acts for none ------------------------------------------


@pytest.mark.parametrize("also_consortium_admin", [False, True], ids=["member-of-none", "admin"])
def test_a_superuser_may_not_act_for_a_consortium_or_an_institution(
    cast, operator, also_consortium_admin
):
    """Being a superuser grants nothing inside a consortium (consortium.core.access): the
    operator, and the consortium's administrator made a superuser too, are refused what their
    memberships do not give, as on the pages. Before, a superuser passed every one of these."""
    actor = "operator"
    if also_consortium_admin:
        cast.admin.is_superuser = cast.admin.is_staff = True
        cast.admin.save(update_fields=["is_superuser", "is_staff"])
        actor = "admin"
    c = f"--consortium={cast.consortium.slug}"
    pem = f"--public-key={ed25519_pem()}"
    for institution in (cast.hospital_a, cast.hospital_b):
        message = refused(
            "create_site_credentials", f"--institution={institution.slug}", pem, f"--actor={actor}"
        )
        assert f"{actor} may not create worker credentials for {institution.slug}" in message
        assert "being a superuser is not enough" in message
    assert not SiteCredential.objects.exists()
    if also_consortium_admin:
        return  # the rest is the consortium administrator's, by membership
    assert "operator may not add institutions" in refused(
        "add_institution", c, "--slug=c", "--name=C", "--actor=operator"
    )
    assert "operator may not invite people to consortium-wide roles" in refused(
        "invite_member", c, "--email=x@example.org", "--role=auditor", "--actor=operator"
    )
    assert f"operator may not invite people to {cast.hospital_a.slug}" in refused(
        "invite_member",
        c,
        f"--institution={cast.hospital_a.slug}",
        "--email=x@example.org",
        "--role=approver",
        "--actor=operator",
    )
    assert not Invitation.objects.exists()
    assert not Institution.objects.filter(slug="c").exists()


def test_create_site_credentials_refusals(cast, tmp_path):
    i = f"--institution={cast.hospital_a.slug}"
    pem = f"--public-key={ed25519_pem()}"
    assert "no institution with the slug 'nope'" in refused(
        "create_site_credentials", "--institution=nope", pem, "--actor=steward"
    )
    # What the page asks: the institution's administrator or data steward, not its approver,
    # not the consortium's administrator, not another institution's member.
    for who in ("approver", "admin", "other_member"):
        assert f"{who} may not create worker credentials for hospital-a" in refused(
            "create_site_credentials", i, pem, f"--actor={who}"
        )
    assert "--public-key: The worker key must be an Ed25519 public key." in refused(
        "create_site_credentials", i, f"--public-key={rsa_pem()}", "--actor=steward"
    )
    assert "--public-key: Not a PEM-encoded public key" in refused(
        "create_site_credentials", i, "--public-key=-----BEGIN PUBLIC KEY-----x", "--actor=steward"
    )
    assert "--public-key: no file" in refused(
        "create_site_credentials", i, f"--public-key={tmp_path / 'none.pem'}", "--actor=steward"
    )
    assert "--public-key is empty" in refused(
        "create_site_credentials", i, "--public-key=", "--actor=steward"
    )
    assert not SiteCredential.objects.exists()


def test_the_actor_is_required_and_active(cast):
    args = [f"--consortium={cast.consortium.slug}", "--slug=c", "--name=C"]
    with pytest.raises(CommandError, match="--actor"):
        run("add_institution", *args)
    cast.admin.is_active = False
    cast.admin.save()
    assert "--actor: the account 'admin' is deactivated" in refused(
        "add_institution", *args, "--actor=admin"
    )


@pytest.mark.django_db(transaction=True)
def test_console_mail_stays_off_standard_output(settings, capsys):
    # The development default prints each mail on standard output, where a script reads the
    # link: the commands send it to standard error instead. (Real commits: the mail is sent
    # when the command's transaction commits, as in production.)
    settings.EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
    User.objects.create_superuser("operator", "ops@example.org", STRONG_PASSWORD)
    link, _ = run(
        "create_consortium",
        "--slug=lfoc",
        "--name=London Oncology",
        "--admin-email=a@example.org",
        "--actor=operator",
    )
    printed = capsys.readouterr()
    assert "Subject: Invitation to join" in printed.err
    assert "Subject:" not in printed.out and link not in printed.out
    assert re.fullmatch(r"\S+/invitations/[^/\s]+/", link), link
