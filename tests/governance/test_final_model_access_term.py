"""The agreement term "final model download" (``final_model_access``): who may take a job's
models away. Its default is the rule the product applied before the term existed, and it is
named in the digested terms only when it differs from that default, so every version written
before it keeps the digest its signatures recorded. Drafted, edited, amended, validated, shown
to the signer, served by the API, published to the ledger and carried into the compliance
report."""

from __future__ import annotations

import json
import re

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from rest_framework.test import APIClient

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.models import LedgerEntry
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import ComplianceScope
from audit.reports.scope import ledger_head
from consortium.governance.models import AgreementVersion, FinalModelAccess
from consortium.governance.services.agreements import (
    agreement_amend,
    agreement_create,
    agreement_version_publish,
    agreement_version_update,
    version_digest,
    version_terms,
)
from tests.support.agreements import (
    TERMS,
    agreement_in_force,
    publish_agreement,
    terms_as_first_written,
)

pytestmark = pytest.mark.django_db


def checked_choice(page: str) -> str:
    """The value of the ticked ``final_model_access`` radio button on a form page."""
    (value,) = re.findall(r'name="final_model_access" value="(\w+)" id="[^"]+" checked', page)
    return value


def test_a_version_with_the_default_keeps_the_digest_of_the_old_format(cast):
    version = publish_agreement(cast)
    assert version.final_model_access == FinalModelAccess.PARTICIPANTS_AND_ADMINS
    old = terms_as_first_written(version)
    assert version_terms(version) == old
    assert version.content_digest == sha256_hex(canonical_json(old))
    again = AgreementVersion.objects.get(pk=version.pk)  # as a migrated row reads
    assert version_digest(again) == version.content_digest


def test_a_version_with_the_other_later_term_keeps_its_digest_too(cast):
    version = publish_agreement(cast, allows_central_validation_set=True)
    old = {**terms_as_first_written(version), "allows_central_validation_set": True}
    assert version.content_digest == sha256_hex(canonical_json(old))


@pytest.mark.parametrize("access", ["participants", "nobody"])
def test_a_narrower_term_is_digested_and_published_to_the_ledger(cast, access):
    version = publish_agreement(cast, final_model_access=access)
    terms = version_terms(version)
    assert terms == {**terms_as_first_written(version), "final_model_access": access}
    assert version.content_digest == sha256_hex(canonical_json(terms))
    # The same terms with the default hash differently: the signer signs the restriction.
    version.final_model_access = FinalModelAccess.PARTICIPANTS_AND_ADMINS
    assert version_digest(version) != version.content_digest
    published = LedgerEntry.objects.get(
        event=ledger_events.AGREEMENT_PUBLISHED, subject_id=str(version.pk)
    )
    assert json.loads(published.payload_text)["terms"]["final_model_access"] == access


def test_the_compliance_report_lists_the_term_when_it_is_not_the_default(cast):
    narrow = agreement_in_force(cast, title="Narrow", final_model_access="nobody")
    scope = ComplianceScope(cast.consortium.slug, narrow.agreement_id, narrow.number)
    doc = ComplianceReport(scope, ledger_head()).document()
    report_terms = doc["terms"] if isinstance(doc["terms"], dict) else json.loads(doc["terms"])
    assert report_terms["final_model_access"] == "nobody"
    wide = agreement_in_force(cast, title="Wide")
    scope = ComplianceScope(cast.consortium.slug, wide.agreement_id, wide.number)
    doc = ComplianceReport(scope, ledger_head()).document()
    report_terms = doc["terms"] if isinstance(doc["terms"], dict) else json.loads(doc["terms"])
    assert "final_model_access" not in report_terms  # the default, as every old version


def test_the_term_is_edited_amended_and_validated(cast):
    draft = agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **TERMS
    )
    assert draft.final_model_access == "participants_and_admins"  # older clients omit it
    with pytest.raises(ValidationError) as caught:
        agreement_version_update(acting_user=cast.admin, version=draft, final_model_access="all")
    assert "final_model_access" in caught.value.message_dict
    with pytest.raises(ValidationError) as caught:
        agreement_create(
            acting_user=cast.admin,
            consortium=cast.consortium,
            title="Bad",
            **TERMS,
            final_model_access="everyone",
        )
    assert "final_model_access" in caught.value.message_dict
    agreement_version_update(acting_user=cast.admin, version=draft, final_model_access="nobody")
    draft.refresh_from_db()
    assert draft.final_model_access == "nobody"
    edited = LedgerEntry.objects.filter(event=ledger_events.AGREEMENT_DRAFT_EDITED).last()
    assert json.loads(edited.payload_text)["changed"] == ["final_model_access"]
    v1 = agreement_version_publish(acting_user=cast.admin, version=draft)
    v2 = agreement_amend(acting_user=cast.admin, agreement=v1.agreement)
    assert v2.final_model_access == "nobody"  # an amendment starts from the terms in force
    agreement_version_update(
        acting_user=cast.admin, version=v2, final_model_access="participants_and_admins"
    )
    v2 = agreement_version_publish(acting_user=cast.admin, version=v2)
    assert "final_model_access" not in version_terms(v2)


def test_the_signer_reads_the_term_in_plain_words(cast):
    client = cast.client_for("approver")
    for access, words in (
        ("nobody", "stays on the consortium's server; no one downloads it"),
        ("participants", "the consortium's administrators may not, unless they are such a member"),
        ("participants_and_admins", "and the consortium's administrators, may download"),
    ):
        version = publish_agreement(cast, title=f"DUA {access}", final_model_access=access)
        url = reverse(
            "consortium:version-detail",
            kwargs={"slug": cast.consortium.slug, "pk": version.agreement_id, "number": 1},
        )
        page = client.get(url).content.decode()
        row = page.split('id="term-final-model-access"', 1)[1].split("</tr>", 1)[0]
        assert words in row.replace("&#x27;", "'"), row


def test_the_draft_form_offers_validates_and_sets_the_term(cast):
    client = cast.client_for("admin")
    url = reverse("consortium:agreement-create", kwargs={"slug": cast.consortium.slug})
    form = client.get(url).content.decode()
    assert "Who may download the final model" in form
    assert checked_choice(form) == "participants_and_admins"  # the default, preselected
    assert "Nobody: the model stays on the consortium&#x27;s server" in form
    data = {
        "title": "Closed DUA",
        **{k: v for k, v in TERMS.items() if k != "permitted_purposes"},
        "permitted_model_families": TERMS["permitted_model_families"],
    }
    refused = client.post(url, {**data, "final_model_access": "everyone"})
    assert refused.status_code == 200
    assert not AgreementVersion.objects.filter(agreement__title="Closed DUA").exists()
    response = client.post(url, {**data, "final_model_access": "nobody"})
    assert response.status_code == 302, response.content.decode()[:2000]
    version = AgreementVersion.objects.get(agreement__title="Closed DUA")
    assert version.final_model_access == "nobody"
    # A form posted without the term (an older page) takes the default.
    client.post(url, {**data, "title": "Plain DUA"})
    plain = AgreementVersion.objects.get(agreement__title="Plain DUA")
    assert plain.final_model_access == "participants_and_admins"


def test_the_draft_edit_form_keeps_the_term(cast):
    draft = agreement_create(
        acting_user=cast.admin,
        consortium=cast.consortium,
        title="Edited DUA",
        **TERMS,
        final_model_access="participants",
    )
    client = cast.client_for("admin")
    url = reverse(
        "consortium:version-edit",
        kwargs={"slug": cast.consortium.slug, "pk": draft.agreement_id, "number": 1},
    )
    assert checked_choice(client.get(url).content.decode()) == "participants"
    data = {
        **{k: v for k, v in TERMS.items() if k != "permitted_purposes"},
        "permitted_model_families": TERMS["permitted_model_families"],
    }
    # A post that leaves the term out (an older page) leaves it as it is.
    response = client.post(url, {**data, "purpose": "Edited purpose."})
    assert response.status_code == 302, response.content.decode()[:2000]
    draft.refresh_from_db()
    assert (draft.purpose, draft.final_model_access) == ("Edited purpose.", "participants")
    response = client.post(url, {**data, "final_model_access": "nobody"})
    assert response.status_code == 302
    draft.refresh_from_db()
    assert draft.final_model_access == "nobody"


def test_the_api_reads_writes_and_validates_the_term(cast):
    client = APIClient()
    client.force_authenticate(cast.admin)
    body = {
        "consortium": cast.consortium.slug,
        "title": "API DUA",
        **{k: str(v) if not isinstance(v, list) else v for k, v in TERMS.items()},
    }
    bad = client.post("/api/agreements/", {**body, "final_model_access": "all"}, format="json")
    assert bad.status_code == 400
    assert "final_model_access" in bad.json()
    created = client.post("/api/agreements/", body, format="json")
    assert created.status_code == 201, created.json()
    version = AgreementVersion.objects.get(agreement__title="API DUA")
    url = f"/api/agreement-versions/{version.pk}/"
    assert client.get(url).json()["final_model_access"] == "participants_and_admins"
    changed = client.patch(url, {"final_model_access": "participants"}, format="json")
    assert changed.status_code == 200, changed.json()
    assert client.get(url).json()["final_model_access"] == "participants"
    client.patch(url, {"purpose": "Another purpose."}, format="json")  # left out: unchanged
    version.refresh_from_db()
    assert version.final_model_access == "participants"
