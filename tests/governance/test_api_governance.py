"""Each governance action through the REST API: its effect on the rows, exactly
one new ledger entry of the right event, and a chain that still verifies; and
the errors a client must be able to act on."""

import datetime as dt

import pytest
from django.core import mail
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.models import (
    AgreementVersion,
    Institution,
    Invitation,
    Membership,
    Role,
    Signature,
    Withdrawal,
)
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_version_publish,
    version_digest,
)
from consortium.governance.services.institutions import institution_create, key_fingerprint
from consortium.governance.services.members import _hash_token, invitation_create
from tests.support.api_client import api
from tests.support.keys import ed25519_pem, rsa_pem
from tests.support.ledger_checks import LedgerWatch

TODAY = dt.date.today()
TERMS = {
    "purpose": "Train a tumour classifier on tabular features.",
    "permitted_model_families": ["linear", "mlp"],
    "max_shared_fraction": "0.4",
    "required_dp_mechanism": "gaussian",
    "epsilon_cap": "8",
    "delta": "0.00001",
    "valid_from": (TODAY - dt.timedelta(days=1)).isoformat(),
    "valid_until": (TODAY + dt.timedelta(days=365)).isoformat(),
    "text": "The parties share model updates only, never patient data.",
}


def draft(cast, **overrides):
    values = {**TERMS, **overrides}
    values["valid_from"] = dt.date.fromisoformat(values["valid_from"])
    values["valid_until"] = dt.date.fromisoformat(values["valid_until"])
    return agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **values
    )


def published(cast):
    return agreement_version_publish(acting_user=cast.admin, version=draft(cast))


def sign_body(cast, version, user=None, institution=None):
    user = user or cast.approver
    return {
        "institution": (institution or cast.hospital_a).slug,
        "typed_name": user.get_full_name(),
        "confirmed": True,
        "content_digest": version.content_digest,
    }


# --- Institutions ------------------------------------------------------------------


def test_create_institution(cast):
    watch = LedgerWatch()
    response = api(cast.admin).post(
        "/api/institutions/",
        {"consortium": cast.consortium.slug, "name": "Hospital C", "country": "UK"},
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["slug"] == "hospital-c"
    institution = Institution.objects.get(slug="hospital-c")
    assert institution.consortium == cast.consortium and institution.country == "UK"
    entry = watch.assert_one(ledger_events.INSTITUTION_CREATED)
    assert entry.institution_slug == "hospital-c"


def test_create_institution_duplicate_slug_is_409(cast):
    response = api(cast.admin).post(
        "/api/institutions/",
        {"consortium": cast.consortium.slug, "name": "Other", "slug": cast.hospital_a.slug},
        format="json",
    )
    assert response.status_code == 409
    assert "already exists" in response.json()["detail"]


def test_steward_registers_worker_key(cast):
    pem = ed25519_pem()
    watch = LedgerWatch()
    response = api(cast.steward).patch(
        f"/api/institutions/{cast.hospital_a.slug}/", {"worker_public_key": pem}, format="json"
    )
    assert response.status_code == 200, response.json()
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.worker_public_key == pem.strip()
    assert response.json()["worker_key_fingerprint"] == key_fingerprint(pem.strip())
    entry = watch.assert_one(ledger_events.INSTITUTION_UPDATED)
    assert "worker_key_fingerprint" in entry.payload_text


@pytest.mark.parametrize(
    "pem, message",
    [
        ("not a key", "Not a PEM-encoded public key"),
        (rsa_pem(key_size=1024), "Ed25519"),
    ],
    ids=["garbage", "rsa"],
)
def test_bad_worker_key_is_400_naming_the_field(cast, pem, message):
    watch = LedgerWatch()
    response = api(cast.admin).patch(
        f"/api/institutions/{cast.hospital_a.slug}/", {"worker_public_key": pem}, format="json"
    )
    assert response.status_code == 400
    assert message in response.json()["worker_public_key"][0]
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.worker_public_key == ""
    watch.assert_none()


# --- Memberships -----------------------------------------------------------------------


def test_change_role(cast):
    membership = Membership.objects.get(user=cast.researcher)
    watch = LedgerWatch()
    response = api(cast.inst_admin).patch(
        f"/api/memberships/{membership.pk}/", {"role": Role.DATA_STEWARD}, format="json"
    )
    assert response.status_code == 200, response.json()
    membership.refresh_from_db()
    assert membership.role == Role.DATA_STEWARD
    watch.assert_one(ledger_events.MEMBER_ROLE_CHANGED)


def test_role_outside_scope_is_400(cast):
    membership = Membership.objects.get(user=cast.researcher)
    response = api(cast.admin).patch(
        f"/api/memberships/{membership.pk}/", {"role": Role.AUDITOR}, format="json"
    )
    assert response.status_code == 400
    assert "consortium-wide role" in response.json()["role"][0]


def test_remove_member(cast):
    membership = Membership.objects.get(user=cast.researcher)
    watch = LedgerWatch()
    response = api(cast.admin).delete(f"/api/memberships/{membership.pk}/")
    assert response.status_code == 204
    assert not Membership.objects.filter(pk=membership.pk).exists()
    watch.assert_one(ledger_events.MEMBER_REMOVED)


def test_removing_the_last_admin_is_409(cast):
    membership = Membership.objects.get(user=cast.admin, role=Role.CONSORTIUM_ADMIN)
    watch = LedgerWatch()
    response = api(cast.admin).delete(f"/api/memberships/{membership.pk}/")
    assert response.status_code == 409
    assert response.json()["code"] == "last_admin"
    assert "last administrator" in response.json()["detail"]
    assert Membership.objects.filter(pk=membership.pk).exists()
    watch.assert_none()


# --- Invitations -------------------------------------------------------------------------


def test_invite_sends_the_token_by_email_only(cast, django_capture_on_commit_callbacks):
    watch = LedgerWatch()
    with django_capture_on_commit_callbacks(execute=True):
        response = api(cast.inst_admin).post(
            "/api/invitations/",
            {
                "consortium": cast.consortium.slug,
                "institution": cast.hospital_a.slug,
                "email": "New.Person@Example.org",
                "role": Role.RESEARCHER,
            },
            format="json",
        )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert "token" not in body and body["status"] == "pending"
    assert body["email"] == "new.person@example.org"
    invitation = Invitation.objects.get(pk=body["id"])
    assert invitation.institution == cast.hospital_a and invitation.role == Role.RESEARCHER
    watch.assert_one(ledger_events.MEMBER_INVITED)
    assert len(mail.outbox) == 1
    token = mail.outbox[0].body.split("/invitations/")[1].split("/")[0]
    assert token not in response.content.decode()
    assert _hash_token(token) == invitation.token_hash


def test_institution_role_needs_an_institution(cast):
    response = api(cast.admin).post(
        "/api/invitations/",
        {"consortium": cast.consortium.slug, "email": "x@example.org", "role": Role.APPROVER},
        format="json",
    )
    assert response.status_code == 400
    assert "belongs to an institution" in response.json()["institution"][0]


def test_revoke_invitation(cast):
    invitation, _ = invitation_create(
        acting_user=cast.admin, consortium=cast.consortium, email="x@example.org", role="auditor"
    )
    watch = LedgerWatch()
    response = api(cast.admin).post(f"/api/invitations/{invitation.pk}/revoke/")
    assert response.status_code == 200
    assert response.json()["status"] == "revoked"
    invitation.refresh_from_db()
    assert invitation.revoked_at is not None
    watch.assert_one(ledger_events.INVITATION_REVOKED)


def test_accept_invitation(cast):
    invitation, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        institution=cast.hospital_b,
        email=cast.outsider.email,
        role=Role.APPROVER,
    )
    watch = LedgerWatch()
    response = api(cast.outsider).post("/api/invitations/accept/", {"token": token}, format="json")
    assert response.status_code == 201, response.json()
    assert response.json()["institution"] == cast.hospital_b.slug
    assert Membership.objects.filter(
        user=cast.outsider, institution=cast.hospital_b, role=Role.APPROVER
    ).exists()
    invitation.refresh_from_db()
    assert invitation.accepted_by == cast.outsider
    watch.assert_one(ledger_events.MEMBER_JOINED)
    # The new member now sees the consortium.
    listing = api(cast.outsider).get("/api/consortia/").json()
    assert [c["slug"] for c in listing["results"]] == [cast.consortium.slug]


def test_accept_with_the_wrong_email_is_400(cast):
    _, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email="someone@example.org",
        role=Role.AUDITOR,
    )
    watch = LedgerWatch()
    response = api(cast.outsider).post("/api/invitations/accept/", {"token": token}, format="json")
    assert response.status_code == 400
    assert response.json()["code"] == "invitation_wrong_user"
    assert "someone@example.org" in response.json()["detail"]
    assert not Membership.objects.filter(user=cast.outsider).exists()
    watch.assert_none()


def test_accept_an_unknown_token_is_404(cast):
    """A token that matches no invitation names nothing: the 404 of any missing object."""
    response = api(cast.outsider).post("/api/invitations/accept/", {"token": "nope"}, format="json")
    assert response.status_code == 404
    assert response.json()["code"] == "invitation_invalid"


def test_accept_expired_or_used_is_409(cast):
    invitation, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email=cast.outsider.email,
        role=Role.AUDITOR,
    )
    Invitation.objects.filter(pk=invitation.pk).update(
        expires_at=timezone.now() - dt.timedelta(minutes=1)
    )
    watch = LedgerWatch()
    response = api(cast.outsider).post("/api/invitations/accept/", {"token": token}, format="json")
    assert response.status_code == 409
    assert response.json()["code"] == "invitation_expired"
    watch.assert_none()

    invitation2, token2 = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email=cast.outsider.email,
        role=Role.AUDITOR,
    )
    assert (
        api(cast.outsider)
        .post("/api/invitations/accept/", {"token": token2}, format="json")
        .status_code
        == 201
    )
    again = api(cast.outsider).post("/api/invitations/accept/", {"token": token2}, format="json")
    assert again.status_code == 409
    assert again.json()["code"] == "invitation_used"


# --- Agreements -----------------------------------------------------------------------------


def test_create_agreement(cast):
    watch = LedgerWatch()
    response = api(cast.admin).post(
        "/api/agreements/",
        {"consortium": cast.consortium.slug, "title": "Data-use agreement", **TERMS},
        format="json",
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    assert body["title"] == "Data-use agreement"
    assert [v["status"] for v in body["versions"]] == ["draft"]
    assert body["status"]["in_force"] is False
    assert body["status"]["reasons"] == ["no version has been published"]
    version = AgreementVersion.objects.get(agreement_id=body["id"])
    assert version.number == 1 and version.permitted_model_families == ["linear", "mlp"]
    watch.assert_one(ledger_events.AGREEMENT_DRAFTED)


def test_create_agreement_with_bad_terms_names_the_field(cast):
    response = api(cast.admin).post(
        "/api/agreements/",
        {"consortium": cast.consortium.slug, "title": "X", **TERMS, "max_shared_fraction": "0"},
        format="json",
    )
    assert response.status_code == 400
    assert "max_shared_fraction" in response.json()


def test_edit_draft(cast):
    version = draft(cast)
    watch = LedgerWatch()
    response = api(cast.admin).patch(
        f"/api/agreement-versions/{version.pk}/", {"epsilon_cap": "4.5"}, format="json"
    )
    assert response.status_code == 200, response.json()
    assert response.json()["epsilon_cap"] == "4.500"
    version.refresh_from_db()
    assert str(version.epsilon_cap) == "4.500"
    watch.assert_one(ledger_events.AGREEMENT_DRAFT_EDITED)


def test_editing_a_published_version_is_409(cast):
    version = published(cast)
    watch = LedgerWatch()
    response = api(cast.admin).patch(
        f"/api/agreement-versions/{version.pk}/", {"text": "Other text."}, format="json"
    )
    assert response.status_code == 409
    assert response.json()["code"] == "version_immutable"
    assert "amendment" in response.json()["detail"]
    watch.assert_none()


def test_publish(cast):
    version = draft(cast)
    watch = LedgerWatch()
    response = api(cast.admin).post(f"/api/agreement-versions/{version.pk}/publish/")
    assert response.status_code == 200, response.json()
    version.refresh_from_db()
    assert version.is_published
    assert response.json()["content_digest"] == version.content_digest == version_digest(version)
    watch.assert_one(ledger_events.AGREEMENT_PUBLISHED)


def test_sign_and_status(cast):
    version = published(cast)
    watch = LedgerWatch()
    response = api(cast.approver).post(
        f"/api/agreement-versions/{version.pk}/sign/", sign_body(cast, version), format="json"
    )
    assert response.status_code == 201, response.json()
    signature = Signature.objects.get(version=version, institution=cast.hospital_a)
    assert signature.signer == cast.approver
    assert signature.content_digest == version.content_digest
    watch.assert_one(ledger_events.AGREEMENT_SIGNED)

    detail = api(cast.researcher).get(f"/api/agreements/{version.agreement_id}/").json()
    assert detail["status"]["signed"] == [cast.hospital_a.slug]
    assert detail["status"]["unsigned"] == [cast.hospital_b.slug]
    assert detail["status"]["in_force"] is False
    assert detail["status"]["current_version"] == 1

    api(cast.approver_b).post(
        f"/api/agreement-versions/{version.pk}/sign/",
        sign_body(cast, version, cast.approver_b, cast.hospital_b),
        format="json",
    )
    status = api(cast.researcher).get(f"/api/agreements/{version.agreement_id}/").json()["status"]
    assert status["in_force"] is True and status["reasons"] == []


def test_stale_signature_is_409_and_writes_nothing(cast):
    version = published(cast)
    body = {**sign_body(cast, version), "content_digest": "0" * 64}
    watch = LedgerWatch()
    response = api(cast.approver).post(
        f"/api/agreement-versions/{version.pk}/sign/", body, format="json"
    )
    assert response.status_code == 409
    assert response.json()["code"] == "stale_version"
    assert not Signature.objects.exists()
    watch.assert_none()


def test_signing_a_superseded_version_is_409(cast):
    version = published(cast)
    amendment = agreement_amend(acting_user=cast.admin, agreement=version.agreement)
    agreement_version_publish(acting_user=cast.admin, version=amendment)
    response = api(cast.approver).post(
        f"/api/agreement-versions/{version.pk}/sign/", sign_body(cast, version), format="json"
    )
    assert response.status_code == 409
    assert "superseded by version 2" in response.json()["detail"]
    assert not Signature.objects.exists()


def test_sign_with_the_wrong_name_is_400(cast):
    version = published(cast)
    body = {**sign_body(cast, version), "typed_name": "Somebody Else"}
    response = api(cast.approver).post(
        f"/api/agreement-versions/{version.pk}/sign/", body, format="json"
    )
    assert response.status_code == 400
    assert "typed_name" in response.json()


def test_amend(cast):
    version = published(cast)
    watch = LedgerWatch()
    response = api(cast.admin).post(f"/api/agreements/{version.agreement_id}/amend/")
    assert response.status_code == 201, response.json()
    assert response.json()["number"] == 2 and response.json()["status"] == "draft"
    assert version.agreement.versions.count() == 2
    watch.assert_one(ledger_events.AGREEMENT_DRAFTED)
    again = api(cast.admin).post(f"/api/agreements/{version.agreement_id}/amend/")
    assert again.status_code == 409
    assert again.json()["code"] == "draft_exists"


def test_withdraw_consent(cast):
    version = published(cast)
    watch = LedgerWatch()
    response = api(cast.approver).post(
        f"/api/agreements/{version.agreement_id}/withdraw/",
        {"institution": cast.hospital_a.slug, "reason": "The ethics board revoked approval."},
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert Withdrawal.objects.filter(
        agreement=version.agreement, institution=cast.hospital_a
    ).exists()
    watch.assert_one(ledger_events.CONSENT_WITHDRAWN)
    status = api(cast.admin).get(f"/api/agreements/{version.agreement_id}/").json()["status"]
    assert status["withdrawn"] == [cast.hospital_a.slug]


def test_withdraw_needs_a_reason(cast):
    version = published(cast)
    response = api(cast.approver).post(
        f"/api/agreements/{version.agreement_id}/withdraw/",
        {"institution": cast.hospital_a.slug, "reason": "no"},
        format="json",
    )
    assert response.status_code == 400
    assert "at least 10 characters" in response.json()["reason"][0]


# --- Input errors and the ledger ---------------------------------------------------------------


def test_malformed_json_is_400(cast):
    response = api(cast.admin).generic(
        "POST", "/api/institutions/", '{"consortium": ', content_type="application/json"
    )
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]


def test_an_unknown_consortium_slug_in_a_body_is_the_404_of_a_hidden_one(cast):
    response = api(cast.admin).post(
        "/api/institutions/", {"consortium": "nope", "name": "X"}, format="json"
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}
    # The other fields are still checked: a body that is wrong in itself is a 400.
    response = api(cast.admin).post(
        "/api/institutions/", {"consortium": cast.consortium.slug, "name": ""}, format="json"
    )
    assert response.status_code == 400 and "name" in response.json()


def test_ledger_list_and_filters(cast):
    published(cast)
    client = api(cast.auditor)
    body = client.get("/api/ledger/", {"consortium": cast.consortium.slug}).json()
    events = [e["event"] for e in body["results"]]
    assert events[0] == ledger_events.CONSORTIUM_CREATED
    assert ledger_events.AGREEMENT_PUBLISHED in events
    first = body["results"][0]
    assert first["payload"] == {"name": "Test Consortium", "slug": cast.consortium.slug}
    assert first["prev_hash"] == "0" * 64 and first["seq"] == 1
    for previous, entry in zip(body["results"], body["results"][1:], strict=False):
        assert entry["prev_hash"] == previous["entry_hash"]

    only = client.get("/api/ledger/", {"event": ledger_events.INSTITUTION_CREATED}).json()
    assert [e["institution_slug"] for e in only["results"]] == ["hospital-a", "hospital-b"]
    assert client.get("/api/ledger/", {"institution": "hospital-b"}).json()["count"] == 1
    future = (timezone.now() + dt.timedelta(hours=1)).isoformat()
    assert client.get("/api/ledger/", {"after": future}).json()["count"] == 0
    assert client.get("/api/ledger/", {"before": future}).json()["count"] == body["count"]


def test_ledger_time_filters_read_any_offset_python_accepts_in_utc(cast):
    """A UTC offset beyond ±15:59 (Python takes up to ±23:59) was a 500 on PostgreSQL, which
    refuses it: the filter compares in UTC on every database. A time that leaves the years 1 to
    9999 in UTC is a 400 naming the parameter."""
    published(cast)
    client = api(cast.auditor)
    total = client.get("/api/ledger/").json()["count"]
    now = timezone.now().astimezone(dt.timezone(dt.timedelta(hours=16, minutes=24)))
    later = (now + dt.timedelta(hours=1)).isoformat()
    earlier = (now - dt.timedelta(days=1)).isoformat()
    assert client.get("/api/ledger/", {"before": later}).json()["count"] == total
    assert client.get("/api/ledger/", {"after": earlier}).json()["count"] == total
    assert client.get("/api/ledger/", {"after": later}).json()["count"] == 0
    old = client.get("/api/ledger/", {"before": "0297-03-11T13:58:35.0+16:24"})
    assert old.status_code == 200 and old.json()["count"] == 0
    response = client.get("/api/ledger/", {"before": "0001-01-01T00:00:00+10:00"})
    assert response.status_code == 400
    assert "years 1 to 9999" in str(response.json()["before"])


def test_verify_ledger(cast):
    response = api(cast.auditor).post(
        "/api/ledger/verify/", {"consortium": cast.consortium.slug}, format="json"
    )
    assert response.status_code == 200
    result = verify_chain()
    assert response.json() == {
        "ok": True,
        "entry_count": result.entry_count,
        "head_hash": result.head_hash,
        "first_bad_seq": None,
        "reason": "",
    }


@pytest.mark.skipif(
    connection.vendor == "postgresql", reason="PostgreSQL's trigger refuses the tampering"
)
def test_verify_names_a_tampered_entry(cast):
    LedgerEntry.objects.filter(seq=2).update(payload_text='{"name":"Forged"}')
    response = api(cast.admin).post(
        "/api/ledger/verify/", {"consortium": cast.consortium.slug}, format="json"
    )
    assert response.status_code == 200
    assert response.json()["ok"] is False
    assert response.json()["first_bad_seq"] == 2
    assert "altered" in response.json()["reason"]


LISTS = [
    "/api/consortia/",
    "/api/institutions/",
    "/api/memberships/",
    "/api/invitations/",
    "/api/agreements/",
    "/api/agreement-versions/",
    "/api/ledger/",
]


def _queries(user, url) -> int:
    client = api(user)
    with CaptureQueriesContext(connection) as ctx:
        assert client.get(url).status_code == 200
    return len(ctx.captured_queries)


def test_lists_do_not_query_per_row(cast):
    def add(n):
        institution_create(acting_user=cast.admin, consortium=cast.consortium, name=f"Extra {n}")
        invitation_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            email=f"extra{n}@example.org",
            role=Role.AUDITOR,
        )
        agreement_version_publish(acting_user=cast.admin, version=draft(cast))

    add(0)
    before = {url: _queries(cast.admin, url) for url in LISTS}
    for n in range(1, 4):
        add(n)
    after = {url: _queries(cast.admin, url) for url in LISTS}
    assert after == before
