"""The agreement term "allows a central validation set": off by default, named in the digested
terms only when it is on, so every version written before the term existed keeps the digest
its signatures recorded; drafted, edited, amended, shown to the signer and served by the API."""

from __future__ import annotations

import json

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.models import AgreementVersion
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_version_publish,
    agreement_version_update,
    version_digest,
    version_terms,
)
from tests.support.agreements import TERMS, publish_agreement, terms_as_first_written

pytestmark = pytest.mark.django_db


def test_a_version_without_the_term_keeps_the_digest_of_the_old_format(cast):
    version = publish_agreement(cast)
    assert version.allows_central_validation_set is False
    old = terms_as_first_written(version)
    assert version_terms(version) == old
    assert version.content_digest == sha256_hex(canonical_json(old))
    # Read back from the database (as a row migrated with the default would be), unchanged.
    again = AgreementVersion.objects.get(pk=version.pk)
    assert version_digest(again) == version.content_digest


def test_the_term_is_digested_when_it_allows_a_central_set(cast):
    version = publish_agreement(cast, allows_central_validation_set=True)
    terms = version_terms(version)
    assert terms == {
        **terms_as_first_written(version),
        "allows_central_validation_set": True,
    }
    assert version.content_digest == sha256_hex(canonical_json(terms))
    # The same terms without the permission hash differently: the signer signs it too.
    version.allows_central_validation_set = False
    assert version_digest(version) != version.content_digest
    published = LedgerEntry.objects.get(
        event=ledger_events.AGREEMENT_PUBLISHED, subject_id=str(version.pk)
    )
    assert json.loads(published.payload_text)["terms"]["allows_central_validation_set"] is True


def test_the_term_is_edited_amended_and_checked(cast):
    draft = agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **TERMS
    )
    assert draft.allows_central_validation_set is False  # older clients do not send it
    agreement_version_update(
        acting_user=cast.admin, version=draft, allows_central_validation_set=True
    )
    draft.refresh_from_db()
    assert draft.allows_central_validation_set is True
    edited = LedgerEntry.objects.filter(event=ledger_events.AGREEMENT_DRAFT_EDITED).last()
    assert json.loads(edited.payload_text)["changed"] == ["allows_central_validation_set"]
    with pytest.raises(ValidationError) as caught:
        agreement_version_update(
            acting_user=cast.admin, version=draft, allows_central_validation_set="yes"
        )
    assert "allows_central_validation_set" in caught.value.message_dict
    v1 = agreement_version_publish(acting_user=cast.admin, version=draft)
    assert version_terms(v1)["allows_central_validation_set"] is True
    v2 = agreement_amend(acting_user=cast.admin, agreement=v1.agreement)
    assert v2.allows_central_validation_set is True  # an amendment starts from the terms in force
    agreement_version_update(
        acting_user=cast.admin, version=v2, allows_central_validation_set=False
    )
    v2 = agreement_version_publish(acting_user=cast.admin, version=v2)
    assert v2.allows_central_validation_set is False
    assert "allows_central_validation_set" not in version_terms(v2)
    assert verify_chain().ok


def test_the_signer_reads_the_term_in_plain_words(cast):
    allowing = publish_agreement(cast, allows_central_validation_set=True)
    client = cast.client_for("approver")
    url = reverse(
        "consortium:version-sign",
        kwargs={"slug": cast.consortium.slug, "pk": allowing.agreement_id, "number": 1},
    )
    page = client.get(url).content.decode()
    assert "an institution's data steward may send records to the consortium's server" in page
    refusing = publish_agreement(cast, title="Another agreement")
    url = reverse(
        "consortium:version-detail",
        kwargs={"slug": cast.consortium.slug, "pk": refusing.agreement_id, "number": 1},
    )
    page = client.get(url).content.decode()
    assert "Not allowed: no institution sends records to the consortium's server" in page


def test_the_draft_form_sets_the_term(cast):
    client = cast.client_for("admin")
    url = reverse("consortium:agreement-create", kwargs={"slug": cast.consortium.slug})
    assert "Allow a central validation set" in client.get(url).content.decode()
    data = {
        "title": "Central DUA",
        **{k: v for k, v in TERMS.items() if k != "permitted_purposes"},
        "permitted_model_families": TERMS["permitted_model_families"],
        "allows_central_validation_set": "on",
    }
    response = client.post(url, data)
    assert response.status_code == 302, response.content.decode()[:2000]
    version = AgreementVersion.objects.get(agreement__title="Central DUA")
    assert version.allows_central_validation_set is True


def test_the_api_reads_and_writes_the_term(cast):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_authenticate(cast.admin)
    body = {
        "consortium": cast.consortium.slug,
        "title": "API DUA",
        **{k: str(v) if not isinstance(v, list) else v for k, v in TERMS.items()},
    }
    created = client.post("/api/agreements/", body, format="json")
    assert created.status_code == 201, created.json()
    version = AgreementVersion.objects.get(agreement__title="API DUA")
    assert version.allows_central_validation_set is False
    url = f"/api/agreement-versions/{version.pk}/"
    assert client.get(url).json()["allows_central_validation_set"] is False
    changed = client.patch(url, {"allows_central_validation_set": True}, format="json")
    assert changed.status_code == 200, changed.json()
    assert client.get(url).json()["allows_central_validation_set"] is True
    # A later edit that leaves it out leaves it as it is.
    client.patch(url, {"purpose": "Another purpose."}, format="json")
    version.refresh_from_db()
    assert version.allows_central_validation_set is True
