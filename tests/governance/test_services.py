"""Governance services: their rules, their refusals, and their ledger entries."""

import datetime as dt

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Membership, Role, Signature
from consortium.governance.selectors import agreement_status
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_sign,
    agreement_version_publish,
    agreement_version_update,
    version_digest,
)
from consortium.governance.services.institutions import (
    institution_create,
    institution_update,
    key_fingerprint,
)
from consortium.governance.services.members import (
    invitation_accept,
    invitation_accept_with_new_account,
    invitation_create,
    invitation_revoke,
    membership_change_role,
    membership_remove,
)
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import sign
from tests.support.factories import UserFactory
from tests.support.keys import ed25519_pem, rsa_pem

TERMS = dict(
    purpose="Tumour classification",
    permitted_model_families=["mlp", "linear"],
    max_shared_fraction="0.4",
    required_dp_mechanism="gaussian",
    epsilon_cap="8",
    delta="0.00001",
    valid_from=dt.date.today() - dt.timedelta(days=1),
    valid_until=dt.date.today() + dt.timedelta(days=30),
    text="Share models, not data.",
)


def last_event():
    return LedgerEntry.objects.order_by("-seq").first().event


def publish(cast, **overrides):
    version = agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **{**TERMS, **overrides}
    )
    return agreement_version_publish(acting_user=cast.admin, version=version)


def test_every_governance_action_is_one_ledger_entry(cast):
    before = LedgerEntry.objects.count()
    version = publish(cast)
    assert LedgerEntry.objects.count() == before + 2  # drafted, published
    assert last_event() == ledger_events.AGREEMENT_PUBLISHED
    sign(version, cast.approver, cast.hospital_a)
    assert last_event() == ledger_events.AGREEMENT_SIGNED
    entry = LedgerEntry.objects.order_by("-seq").first()
    assert entry.institution_slug == cast.hospital_a.slug
    assert entry.actor == cast.approver
    assert version.content_digest in entry.payload_text
    assert verify_chain().ok


def test_agreement_in_force_only_when_every_institution_signed_within_dates(cast):
    version = publish(cast)
    status = agreement_status(version.agreement)
    assert not status.in_force
    assert "Hospital A" in status.reasons[0] and "Hospital B" in status.reasons[0]
    sign(version, cast.approver, cast.hospital_a)
    assert not agreement_status(version.agreement).in_force
    sign(version, cast.approver_b, cast.hospital_b)
    status = agreement_status(version.agreement)
    assert status.in_force, status.reasons
    later = version.valid_until + dt.timedelta(days=1)
    assert not agreement_status(version.agreement, on=later).in_force


def test_amendment_needs_new_signatures(cast):
    version = publish(cast)
    sign(version, cast.approver, cast.hospital_a)
    sign(version, cast.approver_b, cast.hospital_b)
    draft = agreement_amend(acting_user=cast.admin, agreement=version.agreement)
    assert agreement_status(version.agreement).in_force  # the draft changes nothing yet
    agreement_version_update(acting_user=cast.admin, version=draft, epsilon_cap="4")
    v2 = agreement_version_publish(acting_user=cast.admin, version=draft)
    assert v2.content_digest != version.content_digest
    status = agreement_status(version.agreement)
    assert status.version == v2 and not status.in_force
    with pytest.raises(ConflictError, match="superseded"):
        sign(version, cast.approver, cast.hospital_a)


def test_published_version_is_immutable(cast):
    version = publish(cast)
    with pytest.raises(ConflictError, match="cannot change"):
        agreement_version_update(acting_user=cast.admin, version=version, text="new")
    version.refresh_from_db()
    assert version.text == TERMS["text"]


def test_digest_binds_terms_and_text(cast):
    version = publish(cast)
    assert version.content_digest == version_digest(version)
    version.text += " "
    assert version_digest(version) != version.content_digest


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"max_shared_fraction": "1.5"}, "max_shared_fraction"),
        ({"epsilon_cap": "-1"}, "epsilon_cap"),
        ({"delta": "0.5"}, "delta"),
        ({"permitted_model_families": ["quantum"]}, "permitted_model_families"),
        ({"required_dp_mechanism": "wishful"}, "required_dp_mechanism"),
        ({"valid_until": dt.date(2000, 1, 1)}, "valid_until"),
        ({"text": "   "}, "text"),
    ],
)
def test_bad_terms_are_refused_naming_the_field(cast, overrides, field):
    with pytest.raises(ValidationError) as excinfo:
        agreement_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            title="DUA",
            **{**TERMS, **overrides},
        )
    assert field in excinfo.value.message_dict


def test_signing_rules(cast):
    version = publish(cast)
    with pytest.raises(ValidationError) as excinfo:
        agreement_sign(
            acting_user=cast.approver,
            version=version,
            institution=cast.hospital_a,
            typed_name="Someone Else",
            confirmed=True,
        )
    assert "typed_name" in excinfo.value.message_dict
    with pytest.raises(ValidationError):
        agreement_sign(
            acting_user=cast.approver,
            version=version,
            institution=cast.hospital_a,
            typed_name=cast.approver.get_full_name(),
            confirmed=False,
        )
    with pytest.raises(ServiceError, match="Only an approver"):
        sign(version, cast.approver, cast.hospital_b)
    with pytest.raises(ConflictError, match="changed since"):
        agreement_sign(
            acting_user=cast.approver,
            version=version,
            institution=cast.hospital_a,
            typed_name=cast.approver.get_full_name(),
            confirmed=True,
            expected_digest="0" * 64,
        )
    sign(version, cast.approver, cast.hospital_a)
    with pytest.raises(ConflictError, match="already signed"):
        sign(version, cast.approver, cast.hospital_a)
    assert Signature.objects.count() == 1


def test_draft_cannot_be_signed(cast):
    draft = agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **TERMS
    )
    with pytest.raises(ConflictError, match="draft"):
        sign(draft, cast.approver, cast.hospital_a)


def test_withdrawal_blocks_the_institution(cast):
    version = publish(cast)
    sign(version, cast.approver, cast.hospital_a)
    sign(version, cast.approver_b, cast.hospital_b)
    with pytest.raises(ValidationError):
        consent_withdraw(
            acting_user=cast.approver_b,
            agreement=version.agreement,
            institution=cast.hospital_b,
            reason="no",
        )
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=version.agreement,
        institution=cast.hospital_b,
        reason="Our ethics board revoked approval.",
    )
    assert last_event() == ledger_events.CONSENT_WITHDRAWN
    status = agreement_status(version.agreement)
    assert status.eligible_institution_ids == {cast.hospital_a.pk}
    assert status.in_force  # the others go on under it
    with pytest.raises(ConflictError, match="already withdrawn"):
        consent_withdraw(
            acting_user=cast.approver_b,
            agreement=version.agreement,
            institution=cast.hospital_b,
            reason="Our ethics board revoked approval.",
        )


def test_invitation_lifecycle(cast, mailoutbox, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        invitation, token = invitation_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            institution=cast.hospital_a,
            email="New.Person@Example.org",
            role=Role.APPROVER,
        )
    assert token not in invitation.token_hash  # only the hash is stored
    assert len(mailoutbox) == 1 and token in mailoutbox[0].body
    assert last_event() == ledger_events.MEMBER_INVITED
    stranger = UserFactory(email="someone@example.org")
    with pytest.raises(ServiceError, match="was sent to new.person@example.org"):
        invitation_accept(token=token, user=stranger)
    membership = invitation_accept_with_new_account(
        token=token, username="newperson", password="a-long-pass-phrase-9", full_name="New Person"
    )
    assert membership.role == Role.APPROVER and membership.institution == cast.hospital_a
    assert last_event() == ledger_events.MEMBER_JOINED
    with pytest.raises(ConflictError, match="already been accepted"):
        invitation_accept(token=token, user=membership.user)


def test_expired_and_revoked_invitations(cast):
    invitation, token = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email="late@example.org",
        role=Role.AUDITOR,
    )
    invitation.expires_at = timezone.now() - dt.timedelta(seconds=1)
    invitation.save()
    user = UserFactory(email="late@example.org")
    with pytest.raises(ConflictError, match="expired"):
        invitation_accept(token=token, user=user)
    invitation2, token2 = invitation_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        email="late@example.org",
        role=Role.AUDITOR,
    )
    invitation_revoke(acting_user=cast.admin, invitation=invitation2)
    with pytest.raises(ConflictError, match="revoked"):
        invitation_accept(token=token2, user=user)
    with pytest.raises(ServiceError, match="not valid"):
        invitation_accept(token="forged", user=user)
    assert not Membership.objects.filter(user=user).exists()


def test_role_scope_is_checked(cast):
    with pytest.raises(ValidationError):
        invitation_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            email="x@example.org",
            role=Role.APPROVER,  # an institution role without an institution
        )
    with pytest.raises(ValidationError):
        invitation_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            email="x@example.org",
            role=Role.AUDITOR,
            institution=cast.hospital_a,
        )


def test_role_change_and_removal_keep_an_admin(cast):
    admin_membership = Membership.objects.get(user=cast.admin, role=Role.CONSORTIUM_ADMIN)
    with pytest.raises(ConflictError, match="last administrator"):
        membership_remove(acting_user=cast.admin, membership=admin_membership)
    with pytest.raises(ConflictError, match="last administrator"):
        membership_change_role(
            acting_user=cast.admin, membership=admin_membership, role=Role.AUDITOR
        )
    researcher = Membership.objects.get(user=cast.researcher)
    membership_change_role(acting_user=cast.admin, membership=researcher, role=Role.DATA_STEWARD)
    assert last_event() == ledger_events.MEMBER_ROLE_CHANGED
    assert cast.researcher.has_perm("consortium.change_institution", cast.hospital_a)
    membership_remove(acting_user=cast.admin, membership=researcher)
    assert last_event() == ledger_events.MEMBER_REMOVED
    assert not Membership.objects.filter(user=cast.researcher).exists()


def test_worker_public_key_must_be_ed25519(cast):
    pem = ed25519_pem()
    institution_update(acting_user=cast.steward, institution=cast.hospital_a, worker_public_key=pem)
    cast.hospital_a.refresh_from_db()
    assert cast.hospital_a.worker_public_key.startswith("-----BEGIN PUBLIC KEY-----")
    entry = LedgerEntry.objects.order_by("-seq").first()
    assert entry.event == ledger_events.INSTITUTION_UPDATED
    assert key_fingerprint(cast.hospital_a.worker_public_key) in entry.payload_text
    for bad in ("not a key", rsa_pem()):
        with pytest.raises(ValidationError) as excinfo:
            institution_update(
                acting_user=cast.steward, institution=cast.hospital_a, worker_public_key=bad
            )
        assert "worker_public_key" in excinfo.value.message_dict


def test_duplicate_institution_is_a_conflict(cast):
    with pytest.raises(ConflictError):
        institution_create(acting_user=cast.admin, consortium=cast.consortium, name="Hospital A")


def test_permissions_follow_memberships(cast):
    c = cast.consortium
    assert cast.admin.has_perm("consortium.manage_agreements", c)
    assert not cast.approver.has_perm("consortium.manage_agreements", c)
    assert cast.approver.has_perm("consortium.sign_agreement", cast.hospital_a)
    assert not cast.approver.has_perm("consortium.sign_agreement", cast.hospital_b)
    assert not cast.admin.has_perm("consortium.sign_agreement", cast.hospital_a)
    assert cast.auditor.has_perm("audit.view_ledger", c)
    assert not cast.researcher.has_perm("audit.view_ledger", c)
    assert not cast.outsider.has_perm("consortium.view_consortium", c)
    assert cast.inst_admin.has_perm("consortium.invite_to_institution", cast.hospital_a)
    assert not cast.inst_admin.has_perm("consortium.invite_to_institution", cast.hospital_b)
