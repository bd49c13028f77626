"""Governance flows through the browser pages (Django test client).

Each flow asserts on the rows it leaves, on the ledger (exactly one new entry
with the right event per governance action, and nothing for a refused one) and
that the chain still verifies.
"""

from __future__ import annotations

import datetime as dt
import re
from html.parser import HTMLParser

import pytest
from django.contrib.auth import get_user_model
from django.urls import reverse
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.models import LedgerEntry
from consortium.governance import selectors
from consortium.governance.models import (
    Agreement,
    AgreementVersion,
    Institution,
    Invitation,
    Membership,
    Role,
    Signature,
    Withdrawal,
)
from consortium.governance.services.agreements import agreement_amend, version_digest
from consortium.governance.services.institutions import key_fingerprint
from consortium.governance.services.members import invitation_create
from tests.support.keys import ed25519_pem
from tests.support.ledger_checks import ledger_records

pytestmark = pytest.mark.django_db

User = get_user_model()
STRONG_PASSWORD = "quartz-lantern-meadow-91"


# --- helpers ---------------------------------------------------------------------------


def u(name: str, **kwargs) -> str:
    return reverse(f"consortium:{name}", kwargs=kwargs)


def terms(**overrides) -> dict:
    today = timezone.localdate()
    data = {
        "title": "Tumour classifier DUA",
        "purpose": "Train a tumour classifier on tabular features.",
        "permitted_model_families": ["linear", "mlp"],
        "max_shared_fraction": "0.4",
        "required_dp_mechanism": "gaussian",
        "epsilon_cap": "8",
        "delta": "0.00001",
        "valid_from": (today - dt.timedelta(days=1)).isoformat(),
        "valid_until": (today + dt.timedelta(days=365)).isoformat(),
        "text": "The parties share model updates only, never patient data.",
    }
    data.update(overrides)
    return data


def version_kwargs(version: AgreementVersion) -> dict:
    agreement = version.agreement
    return {"slug": agreement.consortium.slug, "pk": agreement.pk, "number": version.number}


def draft_through_form(cast, **overrides) -> AgreementVersion:
    admin = cast.client_for("admin")
    response = admin.post(u("agreement-create", slug=cast.consortium.slug), terms(**overrides))
    assert response.status_code == 302, response.content.decode()[:2000]
    return AgreementVersion.objects.latest("pk")


def publish_through_form(cast, version) -> AgreementVersion:
    response = cast.client_for("admin").post(u("version-publish", **version_kwargs(version)))
    assert response.status_code == 302
    version.refresh_from_db()
    assert version.is_published
    return version


def sign_data(cast, who: str, version, **overrides) -> dict:
    user = getattr(cast, who)
    institution = cast.hospital_a if who == "approver" else cast.hospital_b
    data = {
        "institution": institution.pk,
        "typed_name": user.get_full_name(),
        "confirmed": "on",
        "expected_digest": version.content_digest,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def invite(cast, django_capture_on_commit_callbacks, *, who="admin", **data):
    with django_capture_on_commit_callbacks(execute=True):
        return cast.client_for(who).post(u("member-invite", slug=cast.consortium.slug), data)


def token_from(mail) -> str:
    match = re.search(r"/invitations/([^/\s]+)/", mail.body)
    assert match, mail.body
    return match.group(1)


# --- institutions ----------------------------------------------------------------------


def test_admin_adds_an_institution_with_a_worker_key(cast):
    client = cast.client_for("admin")
    url = u("institution-create", slug=cast.consortium.slug)
    assert client.get(url).status_code == 200
    pem = ed25519_pem()
    with ledger_records(ledger_events.INSTITUTION_CREATED):
        response = client.post(
            url, {"name": "St Mary's", "slug": "", "country": "UK", "worker_public_key": pem}
        )
    institution = Institution.objects.get(name="St Mary's")
    assert institution.slug == "st-marys"
    assert response.url == u("institution-detail", slug=cast.consortium.slug, inst_slug="st-marys")
    page = client.get(response.url).content.decode()
    assert key_fingerprint(institution.worker_public_key) in page


def test_institution_form_shows_service_errors_and_keeps_input(cast):
    client = cast.client_for("admin")
    url = u("institution-create", slug=cast.consortium.slug)
    with ledger_records():
        bad_key = client.post(url, {"name": "Clinic C", "worker_public_key": "not a key"})
        duplicate = client.post(url, {"name": "Hospital A"})
    assert bad_key.status_code == 200
    assert "Not a PEM-encoded public key" in str(
        bad_key.context["form"].errors["worker_public_key"]
    )
    assert 'value="Clinic C"' in bad_key.content.decode()
    assert "already" in str(duplicate.context["form"].non_field_errors())
    assert not Institution.objects.filter(name="Clinic C").exists()


def test_data_steward_registers_the_worker_key(cast):
    client = cast.client_for("steward")
    url = u("institution-edit", slug=cast.consortium.slug, inst_slug=cast.hospital_a.slug)
    pem = ed25519_pem()
    with ledger_records(ledger_events.INSTITUTION_UPDATED):
        response = client.post(url, {"name": "Hospital A", "country": "", "worker_public_key": pem})
    assert response.status_code == 302
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.worker_public_key.startswith("-----BEGIN PUBLIC KEY-----")


# --- invitations -------------------------------------------------------------------------


def test_invite_then_accept_with_a_new_account(
    cast, mailoutbox, django_capture_on_commit_callbacks
):
    with ledger_records(ledger_events.MEMBER_INVITED):
        response = invite(
            cast,
            django_capture_on_commit_callbacks,
            email="New.Person@example.org",
            role=Role.APPROVER,
            institution=cast.hospital_a.pk,
        )
    assert response.status_code == 302
    assert len(mailoutbox) == 1
    assert mailoutbox[0].to == ["new.person@example.org"]
    url = u("invitation-accept", token=token_from(mailoutbox[0]))

    visitor = cast.client_for("anonymous")
    page = visitor.get(url)
    assert page.status_code == 200
    text = page.content.decode()
    assert "new.person@example.org" in text and "Hospital A" in text and "Approver" in text
    assert "Ada Admin" in text  # who invited
    assert reverse("login") + "?next=" + url in text

    account = {
        "username": "newperson",
        "full_name": "Nora Newperson",
        "password": STRONG_PASSWORD,
        "password_confirm": STRONG_PASSWORD + "x",
    }
    with ledger_records():
        mismatch = visitor.post(url, account)
    assert "differ" in str(mismatch.context["form"].errors["password_confirm"])
    assert not User.objects.filter(username="newperson").exists()

    account["password_confirm"] = STRONG_PASSWORD
    with ledger_records(ledger_events.MEMBER_JOINED):
        joined = visitor.post(url, account)
    assert joined.status_code == 302
    assert joined.url == u("consortium-detail", slug=cast.consortium.slug)
    user = User.objects.get(username="newperson")
    assert user.email == "new.person@example.org"
    assert user.get_full_name() == "Nora Newperson"
    assert Membership.objects.filter(
        user=user, institution=cast.hospital_a, role=Role.APPROVER
    ).exists()
    # Signed in: the dashboard opens without a login.
    assert visitor.get(joined.url).status_code == 200
    # The link is used up.
    assert visitor.get(url).status_code == 410


def test_accept_as_a_signed_in_existing_user(cast, mailoutbox, django_capture_on_commit_callbacks):
    invite(
        cast,
        django_capture_on_commit_callbacks,
        email=cast.outsider.email,
        role=Role.RESEARCHER,
        institution=cast.hospital_b.pk,
    )
    url = u("invitation-accept", token=token_from(mailoutbox[0]))
    client = cast.client_for("outsider")
    assert "Accept the invitation" in client.get(url).content.decode()
    with ledger_records(ledger_events.MEMBER_JOINED):
        response = client.post(url)
    assert response.status_code == 302
    assert Membership.objects.filter(
        user=cast.outsider, institution=cast.hospital_b, role=Role.RESEARCHER
    ).exists()
    invitation = Invitation.objects.get(email=cast.outsider.email)
    assert invitation.accepted_by == cast.outsider


def test_an_invitation_for_another_email_is_refused(
    cast, mailoutbox, django_capture_on_commit_callbacks
):
    invite(cast, django_capture_on_commit_callbacks, email="someone@example.org", role="auditor")
    url = u("invitation-accept", token=token_from(mailoutbox[0]))
    with ledger_records():
        response = cast.client_for("outsider").post(url)
    assert response.status_code == 400
    assert "This invitation was sent to someone@example.org" in response.content.decode()
    assert not Membership.objects.filter(user=cast.outsider).exists()


def test_expired_revoked_and_unknown_invitations(cast, django_capture_on_commit_callbacks):
    _, token = invitation_create(
        acting_user=cast.admin, consortium=cast.consortium, email="late@example.org", role="auditor"
    )
    Invitation.objects.filter(email="late@example.org").update(
        expires_at=timezone.now() - dt.timedelta(minutes=1)
    )
    url = u("invitation-accept", token=token)
    visitor = cast.client_for("anonymous")
    with ledger_records():
        for response in (
            visitor.get(url),
            visitor.post(url, {"username": "late", "full_name": "L", "password": "x"}),
        ):
            assert response.status_code == 410
            assert "expired" in response.content.decode()
    assert not User.objects.filter(username="late").exists()

    invitation, token = invitation_create(
        acting_user=cast.admin, consortium=cast.consortium, email="gone@example.org", role="auditor"
    )
    with ledger_records(ledger_events.INVITATION_REVOKED):
        revoke = cast.client_for("admin").post(
            u("invitation-revoke", slug=cast.consortium.slug, pk=invitation.pk)
        )
    assert revoke.status_code == 302
    revoked = visitor.get(u("invitation-accept", token=token))
    assert revoked.status_code == 410 and "revoked" in revoked.content.decode()

    unknown = visitor.get(u("invitation-accept", token="no-such-token"))
    assert unknown.status_code == 404
    assert "not valid" in unknown.content.decode()


def test_institution_admin_invites_only_to_their_institution(
    cast, mailoutbox, django_capture_on_commit_callbacks
):
    kw = {"who": "inst_admin"}
    with ledger_records():
        auditor = invite(
            cast, django_capture_on_commit_callbacks, email="a@x.org", role="auditor", **kw
        )
        other = invite(
            cast,
            django_capture_on_commit_callbacks,
            email="b@x.org",
            role="approver",
            institution=cast.hospital_b.pk,
            **kw,
        )
        nowhere = invite(
            cast, django_capture_on_commit_callbacks, email="c@x.org", role="approver", **kw
        )
    assert "role" in auditor.context["form"].errors
    assert "institution" in other.context["form"].errors
    assert "institution" in nowhere.context["form"].errors
    assert not mailoutbox
    with ledger_records(ledger_events.MEMBER_INVITED):
        ok = invite(
            cast,
            django_capture_on_commit_callbacks,
            email="d@x.org",
            role="approver",
            institution=cast.hospital_a.pk,
            **kw,
        )
    assert ok.status_code == 302
    assert len(mailoutbox) == 1


# --- memberships -------------------------------------------------------------------------


def _membership(user, role=None):
    qs = Membership.objects.filter(user=user)
    return qs.get(role=role) if role else qs.get()


def test_change_role_and_remove_a_member(cast):
    client = cast.client_for("admin")
    slug = cast.consortium.slug
    membership = _membership(cast.researcher)
    with ledger_records(ledger_events.MEMBER_ROLE_CHANGED):
        response = client.post(
            u("membership-role", slug=slug, pk=membership.pk), {"role": "data_steward"}
        )
    assert response.status_code == 302
    membership.refresh_from_db()
    assert membership.role == Role.DATA_STEWARD

    # An institution membership cannot become a consortium-wide role.
    with ledger_records():
        client.post(u("membership-role", slug=slug, pk=membership.pk), {"role": "auditor"})
    membership.refresh_from_db()
    assert membership.role == Role.DATA_STEWARD

    remove_url = u("membership-remove", slug=slug, pk=membership.pk)
    confirm = client.get(remove_url)
    assert confirm.status_code == 200 and "Remove this role" in confirm.content.decode()
    with ledger_records(ledger_events.MEMBER_REMOVED):
        removed = client.post(remove_url)
    assert removed.status_code == 302
    assert not Membership.objects.filter(pk=membership.pk).exists()


def test_the_last_admin_cannot_be_removed(cast):
    membership = _membership(cast.admin, Role.CONSORTIUM_ADMIN)
    client = cast.client_for("admin")
    url = u("membership-remove", slug=cast.consortium.slug, pk=membership.pk)
    with ledger_records():
        response = client.post(url)
        demoted = client.post(
            u("membership-role", slug=cast.consortium.slug, pk=membership.pk), {"role": "auditor"}
        )
    assert response.status_code == 200
    assert "last administrator" in response.content.decode()
    assert demoted.status_code == 302
    assert Membership.objects.filter(pk=membership.pk, role=Role.CONSORTIUM_ADMIN).exists()


def test_member_list_shows_memberships_and_invitations(cast):
    invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email="pending@example.org",
        role="approver",
        institution=cast.hospital_a,
    )
    url = u("member-list", slug=cast.consortium.slug)
    admin_page = cast.client_for("admin").get(url).content.decode()
    assert "pending@example.org" in admin_page and "Revoke" in admin_page
    member_page = cast.client_for("other_member").get(url).content.decode()
    assert "inst_admin" in member_page
    assert "pending@example.org" not in member_page and "Revoke" not in member_page


# --- agreements -------------------------------------------------------------------------


def test_draft_edit_publish_and_published_is_immutable(cast):
    client = cast.client_for("admin")
    with ledger_records():
        bad = client.post(
            u("agreement-create", slug=cast.consortium.slug),
            terms(permitted_model_families=[], valid_until="2000-01-01", epsilon_cap="-1"),
        )
    assert bad.status_code == 200
    assert {"permitted_model_families"} <= set(bad.context["form"].errors)
    assert not Agreement.objects.exists()

    with ledger_records(ledger_events.AGREEMENT_DRAFTED):
        version = draft_through_form(cast)
    assert version.number == 1 and not version.is_published

    edit_url = u("version-edit", **version_kwargs(version))
    form_page = client.get(edit_url)
    assert form_page.status_code == 200
    assert form_page.context["form"].initial["purpose"] == version.purpose
    edited = terms(purpose="Segment tumours.", permitted_model_families=["unet"])
    del edited["title"]
    with ledger_records(ledger_events.AGREEMENT_DRAFT_EDITED):
        assert client.post(edit_url, edited).status_code == 302
    version.refresh_from_db()
    assert version.purpose == "Segment tumours."
    assert version.permitted_model_families == ["unet"]

    publish_url = u("version-publish", **version_kwargs(version))
    assert "Publishing freezes" in client.get(publish_url).content.decode()
    with ledger_records(ledger_events.AGREEMENT_PUBLISHED):
        publish_through_form(cast, version)
    assert version.content_digest == version_digest(version)

    immutable = client.get(edit_url)
    assert "published and immutable" in immutable.content.decode()
    with ledger_records():
        refused = client.post(edit_url, terms(purpose="Something else."))
    assert "cannot change" in str(refused.context["form"].non_field_errors())
    version.refresh_from_db()
    assert version.purpose == "Segment tumours."

    detail = client.get(u("version-detail", **version_kwargs(version))).content.decode()
    assert version.content_digest in detail and "Segment tumours." in detail


def test_each_approver_signs_and_the_agreement_comes_into_force(cast):
    version = publish_through_form(cast, draft_through_form(cast))
    agreement = version.agreement
    sign_url = u("version-sign", **version_kwargs(version))
    approver = cast.client_for("approver")

    page = approver.get(sign_url)
    assert page.status_code == 200
    text = page.content.decode()
    assert version.content_digest in text and version.text in text
    assert "sign it on behalf of Hospital A" in text
    assert page.context["form"].initial["expected_digest"] == version.content_digest

    with ledger_records():
        mismatch = approver.post(
            sign_url, sign_data(cast, "approver", version, typed_name="Someone Else")
        )
        unconfirmed = approver.post(sign_url, sign_data(cast, "approver", version, confirmed=None))
        foreign = approver.post(
            sign_url, sign_data(cast, "approver", version, institution=cast.hospital_b.pk)
        )
    assert "Type your full name" in str(mismatch.context["form"].errors["typed_name"])
    assert "Confirm" in str(unconfirmed.context["form"].errors["confirmed"])
    assert "institution" in foreign.context["form"].errors
    assert 'value="Someone Else"' in mismatch.content.decode()
    assert not Signature.objects.exists()

    with ledger_records(ledger_events.AGREEMENT_SIGNED):
        assert approver.post(sign_url, sign_data(cast, "approver", version)).status_code == 302
    status = selectors.agreement_status(agreement)
    assert not status.in_force
    assert any("Hospital B" in r for r in status.reasons)
    assert (
        "not in force"
        in approver.get(
            u("agreement-detail", slug=cast.consortium.slug, pk=agreement.pk)
        ).content.decode()
    )

    with ledger_records(ledger_events.AGREEMENT_SIGNED):
        response = cast.client_for("approver_b").post(
            sign_url, sign_data(cast, "approver_b", version)
        )
    assert response.status_code == 302
    assert selectors.agreement_status(agreement).in_force
    signature = Signature.objects.get(institution=cast.hospital_b)
    assert signature.typed_name == cast.approver_b.get_full_name()
    assert signature.content_digest == version.content_digest
    dashboard = cast.client_for("auditor").get(u("consortium-detail", slug=cast.consortium.slug))
    assert dashboard.context["dashboard"].in_force.agreement == agreement

    with ledger_records():
        again = approver.post(sign_url, sign_data(cast, "approver", version))
    assert "already signed" in str(again.context["form"].non_field_errors())


def test_outside_its_dates_a_fully_signed_agreement_is_not_in_force(cast):
    start = timezone.localdate() + dt.timedelta(days=10)
    version = publish_through_form(
        cast,
        draft_through_form(
            cast,
            valid_from=start.isoformat(),
            valid_until=(start + dt.timedelta(days=30)).isoformat(),
        ),
    )
    sign_url = u("version-sign", **version_kwargs(version))
    for who in ("approver", "approver_b"):
        assert cast.client_for(who).post(sign_url, sign_data(cast, who, version)).status_code == 302
    status = selectors.agreement_status(version.agreement)
    assert not status.in_force
    assert status.reasons == [
        f"version 1 is valid from {start} to {start + dt.timedelta(days=30)}, "
        f"not on {timezone.localdate()}"
    ]
    assert selectors.agreement_status(version.agreement, on=start).in_force


def test_a_superseded_version_cannot_be_signed(cast):
    v1 = publish_through_form(cast, draft_through_form(cast))
    agreement = v1.agreement
    approver = cast.client_for("approver")
    v1_url = u("version-sign", **version_kwargs(v1))
    stale_digest = approver.get(v1_url).context["form"].initial["expected_digest"]

    admin = cast.client_for("admin")
    with ledger_records(ledger_events.AGREEMENT_DRAFTED):
        amend = admin.post(u("agreement-amend", slug=cast.consortium.slug, pk=agreement.pk))
    v2 = agreement.versions.get(number=2)
    assert amend.url == u("version-edit", **version_kwargs(v2))
    new_terms = terms(text="Amended: model updates only, with DP-SGD.")
    del new_terms["title"]
    assert admin.post(amend.url, new_terms).status_code == 302
    publish_through_form(cast, v2)

    with ledger_records():
        old = approver.post(v1_url, sign_data(cast, "approver", v1, expected_digest=stale_digest))
        wrong_digest = approver.post(
            u("version-sign", **version_kwargs(v2)),
            sign_data(cast, "approver", v2, expected_digest=stale_digest),
        )
    assert old.status_code == 200
    assert "superseded by version 2" in str(old.context["form"].non_field_errors())
    assert "changed since you opened it" in str(wrong_digest.context["form"].non_field_errors())
    assert not Signature.objects.exists()
    # A second amendment while one is open is refused with a message.
    admin.post(u("agreement-amend", slug=cast.consortium.slug, pk=agreement.pk))
    with ledger_records():
        admin.post(u("agreement-amend", slug=cast.consortium.slug, pk=agreement.pk))
    assert agreement.versions.count() == 3


def test_withdrawal_with_reason_is_recorded(cast):
    version = publish_through_form(cast, draft_through_form(cast))
    agreement = version.agreement
    url = u("agreement-withdraw", slug=cast.consortium.slug, pk=agreement.pk)
    client = cast.client_for("inst_admin")
    page = client.get(url).content.decode()
    assert "blocks the institution from every future training job" in page
    with ledger_records():
        short = client.post(url, {"institution": cast.hospital_a.pk, "reason": "no"})
    assert "at least 10 characters" in str(short.context["form"].errors["reason"])

    reason = "Our ethics board revoked approval for this study."
    with ledger_records(ledger_events.CONSENT_WITHDRAWN):
        response = client.post(url, {"institution": cast.hospital_a.pk, "reason": reason})
    assert response.status_code == 302
    withdrawal = Withdrawal.objects.get()
    assert withdrawal.institution == cast.hospital_a and withdrawal.reason == reason
    assert withdrawal.withdrawn_by == cast.inst_admin
    entry = LedgerEntry.objects.order_by("-seq").first()
    assert reason in entry.payload_text
    assert reason in client.get(response.url).content.decode()
    # Hospital A is out; it can no longer sign.
    with ledger_records():
        refused = cast.client_for("approver").post(
            u("version-sign", **version_kwargs(version)), sign_data(cast, "approver", version)
        )
    assert "withdrawn" in str(refused.context["form"].non_field_errors())


def test_dashboard_shows_roles_pending_signatures_and_the_ledger_link(cast):
    version = publish_through_form(cast, draft_through_form(cast))
    url = u("consortium-detail", slug=cast.consortium.slug)
    approver_page = cast.client_for("approver").get(url)
    text = approver_page.content.decode()
    assert f"Sign version {version.number}" in text
    assert u("version-sign", **version_kwargs(version)) in text
    assert "Approver" in text and "v1 unsigned" in text
    ledger = reverse("audit:ledger", kwargs={"slug": cast.consortium.slug})
    assert ledger not in text
    for who in ("admin", "auditor"):
        assert ledger in cast.client_for(who).get(url).content.decode()
    researcher_page = cast.client_for("researcher").get(url).content.decode()
    assert "Sign version" not in researcher_page


# --- forms are labelled -------------------------------------------------------------------


class _FormControls(HTMLParser):
    def __init__(self):
        super().__init__()
        self.label_for: set[str] = set()
        self.controls: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "label" and attrs.get("for"):
            self.label_for.add(attrs["for"])
        if tag in {"input", "select", "textarea"} and attrs.get("type") not in {
            "hidden",
            "submit",
        }:
            self.controls.append((attrs.get("name"), attrs.get("id")))


def test_every_form_control_has_a_label(cast):
    version = publish_through_form(cast, draft_through_form(cast))
    agreement_amend(acting_user=cast.admin, agreement=version.agreement)
    draft = version.agreement.versions.get(number=2)
    _, token = invitation_create(
        acting_user=cast.admin, consortium=cast.consortium, email="x@example.org", role="auditor"
    )
    slug = cast.consortium.slug
    pages = [
        ("admin", u("institution-create", slug=slug)),
        ("admin", u("institution-edit", slug=slug, inst_slug=cast.hospital_a.slug)),
        ("admin", u("member-list", slug=slug)),
        ("admin", u("member-invite", slug=slug)),
        ("admin", u("agreement-create", slug=slug)),
        ("admin", u("version-edit", **version_kwargs(draft))),
        ("approver", u("version-sign", **version_kwargs(version))),
        ("approver", u("agreement-withdraw", slug=slug, pk=version.agreement.pk)),
        ("anonymous", u("invitation-accept", token=token)),
    ]
    for who, url in pages:
        response = cast.client_for(who).get(url)
        assert response.status_code == 200, url
        parser = _FormControls()
        parser.feed(response.content.decode())
        assert parser.controls, url
        for name, control_id in parser.controls:
            assert control_id and control_id in parser.label_for, (url, name)


def test_the_slug_of_the_add_page_is_reserved(cast):
    with ledger_records():
        response = cast.client_for("admin").post(
            u("institution-create", slug=cast.consortium.slug), {"name": "New"}
        )
    assert "reserved" in str(response.context["form"].errors["slug"])


def test_the_dashboards_institutions_table_filters_sorts_and_pages_on_the_server(cast):
    import re

    from consortium.dashboard import tables

    url = f"/consortia/{cast.consortium.slug}/"
    client = cast.client_for("admin")

    def names(query: str) -> list[str]:
        html = client.get(url + query).content.decode()
        body = html.split('id="institutions"', 1)[1].split("</table>", 1)[0]
        return re.findall(r'<td >\s*<a href="[^"]+">([^<]+)</a>', body) or re.findall(
            r'<a href="/consortia/[^"]+/institutions/[^"]+/">([^<]+)</a>', body
        )

    assert names("") == sorted(names(""))
    assert names("?sort=-name") == sorted(names(""), reverse=True)
    assert names("?q=" + cast.hospital_b.name.split()[-1]) == [cast.hospital_b.name]
    everyone = names("")
    saved, tables.INSTITUTIONS_PER_PAGE = tables.INSTITUTIONS_PER_PAGE, 1
    try:
        assert names("?page=2") == [everyone[1]]  # one a page, by name
    finally:
        tables.INSTITUTIONS_PER_PAGE = saved
