"""The agreement's privacy-audit terms (``privacy_audit_required``, ``audit_max_median_ssim``,
``audit_max_success_rate``): later terms that leave every earlier version's digest alone,
validated alike by the service, the web form and the API (a maximum without the audit required
is refused), shown to the signer in plain words, and carried into the compliance report."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse
from rest_framework.test import APIClient

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.models import LedgerEntry
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import ComplianceScope
from audit.reports.compliance_pdf import _later_terms_text
from audit.reports.scope import ledger_head
from consortium.governance.models import AgreementVersion
from consortium.governance.services.agreements import (
    MAXIMUM_NEEDS_AUDIT,
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

AUDIT_TERMS = ("privacy_audit_required", "audit_max_median_ssim", "audit_max_success_rate")


def form_data(**overrides) -> dict:
    return {
        **{k: v for k, v in TERMS.items() if k != "permitted_purposes"},
        "permitted_model_families": TERMS["permitted_model_families"],
        **overrides,
    }


def test_a_version_without_the_audit_keeps_the_digest_of_the_old_format(cast):
    version = publish_agreement(cast)
    assert (version.privacy_audit_required, version.audit_max_median_ssim) == (False, None)
    assert version.audit_max_success_rate is None
    old = terms_as_first_written(version)
    assert version_terms(version) == old
    assert version.content_digest == sha256_hex(canonical_json(old))
    again = AgreementVersion.objects.get(pk=version.pk)  # as a migrated row reads
    assert version_digest(again) == version.content_digest


def test_the_audit_terms_are_digested_canonically_and_published(cast):
    version = publish_agreement(
        cast,
        privacy_audit_required=True,
        audit_max_median_ssim="0.30",
        audit_max_success_rate=Decimal("0.250"),
    )
    terms = version_terms(version)
    assert terms == {
        **terms_as_first_written(version),
        "privacy_audit_required": True,
        "audit_max_median_ssim": "0.3",
        "audit_max_success_rate": "0.25",
    }
    assert version.content_digest == sha256_hex(canonical_json(terms))
    again = AgreementVersion.objects.get(pk=version.pk)  # Decimal("0.300") from the database
    assert version_digest(again) == version.content_digest
    # Each term is signed: another maximum is another digest.
    again.audit_max_median_ssim = Decimal("0.4")
    assert version_digest(again) != version.content_digest
    published = LedgerEntry.objects.get(
        event=ledger_events.AGREEMENT_PUBLISHED, subject_id=str(version.pk)
    )
    payload_terms = json.loads(published.payload_text)["terms"]
    assert payload_terms["audit_max_median_ssim"] == "0.3"
    assert payload_terms["privacy_audit_required"] is True


def test_requiring_the_audit_alone_is_a_term_of_its_own(cast):
    version = publish_agreement(cast, privacy_audit_required=True)
    assert version_terms(version) == {
        **terms_as_first_written(version),
        "privacy_audit_required": True,
    }


@pytest.mark.parametrize(
    ("changes", "field", "words"),
    [
        ({"audit_max_median_ssim": "0.3"}, "audit_max_median_ssim", MAXIMUM_NEEDS_AUDIT),
        ({"audit_max_success_rate": "0"}, "audit_max_success_rate", MAXIMUM_NEEDS_AUDIT),
        (
            {"privacy_audit_required": True, "audit_max_median_ssim": "0"},
            "audit_max_median_ssim",
            "above 0 and at most 1",
        ),
        (
            {"privacy_audit_required": True, "audit_max_success_rate": "1.5"},
            "audit_max_success_rate",
            "from 0 to 1",
        ),
        (
            {"privacy_audit_required": True, "audit_max_success_rate": "0.1234"},
            "audit_max_success_rate",
            "at most three decimals",
        ),
        (
            {"privacy_audit_required": True, "audit_max_median_ssim": "abc"},
            "audit_max_median_ssim",
            "Enter a number",
        ),
        ({"privacy_audit_required": "yes"}, "privacy_audit_required", "yes or no"),
    ],
)
def test_bad_audit_terms_are_refused_naming_the_term(cast, changes, field, words):
    with pytest.raises(ValidationError) as caught:
        agreement_create(
            acting_user=cast.admin, consortium=cast.consortium, title="Bad", **TERMS, **changes
        )
    assert words in " ".join(caught.value.message_dict[field])
    assert not AgreementVersion.objects.filter(agreement__title="Bad").exists()


def test_the_edges_of_the_maxima_are_accepted(cast):
    version = publish_agreement(
        cast, privacy_audit_required=True, audit_max_median_ssim="1", audit_max_success_rate="0"
    )
    assert (version.audit_max_median_ssim, version.audit_max_success_rate) == (1, 0)
    assert version_terms(version)["audit_max_success_rate"] == "0"  # not left out: 0 is a cap


def test_the_terms_are_edited_cleared_and_amended(cast):
    draft = agreement_create(
        acting_user=cast.admin, consortium=cast.consortium, title="DUA", **TERMS
    )
    # A maximum on a draft that does not require the audit: refused once merged.
    with pytest.raises(ValidationError) as caught:
        agreement_version_update(acting_user=cast.admin, version=draft, audit_max_median_ssim="0.3")
    assert caught.value.message_dict["audit_max_median_ssim"] == [MAXIMUM_NEEDS_AUDIT]
    agreement_version_update(
        acting_user=cast.admin,
        version=draft,
        privacy_audit_required=True,
        audit_max_median_ssim="0.3",
    )
    draft.refresh_from_db()
    assert (draft.privacy_audit_required, draft.audit_max_median_ssim) == (True, Decimal("0.3"))
    edited = LedgerEntry.objects.filter(event=ledger_events.AGREEMENT_DRAFT_EDITED).last()
    assert json.loads(edited.payload_text)["changed"] == [
        "audit_max_median_ssim",
        "privacy_audit_required",
    ]
    # Dropping the requirement while a maximum stands is refused...
    with pytest.raises(ValidationError) as caught:
        agreement_version_update(
            acting_user=cast.admin, version=draft, privacy_audit_required=False
        )
    assert caught.value.message_dict["audit_max_median_ssim"] == [MAXIMUM_NEEDS_AUDIT]
    # ...and allowed together with clearing it (None clears a maximum).
    agreement_version_update(
        acting_user=cast.admin,
        version=draft,
        privacy_audit_required=False,
        audit_max_median_ssim=None,
    )
    draft.refresh_from_db()
    assert (draft.privacy_audit_required, draft.audit_max_median_ssim) == (False, None)
    agreement_version_update(
        acting_user=cast.admin,
        version=draft,
        privacy_audit_required=True,
        audit_max_success_rate="0.125",
    )
    v1 = agreement_version_publish(acting_user=cast.admin, version=draft)
    v2 = agreement_amend(acting_user=cast.admin, agreement=v1.agreement)
    assert (v2.privacy_audit_required, v2.audit_max_success_rate) == (True, Decimal("0.125"))


def test_the_signer_reads_the_terms_in_plain_words(cast):
    client = cast.client_for("approver")

    def row_of(version) -> str:
        url = reverse(
            "consortium:version-detail",
            kwargs={"slug": cast.consortium.slug, "pk": version.agreement_id, "number": 1},
        )
        page = client.get(url).content.decode().replace("&#x27;", "'")
        return page.split('id="term-privacy-audit"', 1)[1].split("</tr>", 1)[0]

    plain = row_of(publish_agreement(cast, title="Plain"))
    assert "Not required" in plain and "SSIM" not in plain
    capped = row_of(
        publish_agreement(
            cast,
            title="Capped",
            privacy_audit_required=True,
            audit_max_median_ssim="0.30",
            audit_max_success_rate="0.25",
        )
    )
    assert "<strong>Required</strong>" in capped
    assert "at most <strong>0.3</strong>" in capped
    assert "1 is an exact copy; around 0.3 a reconstruction is hard to recognise" in capped
    assert "rebuild at most <strong>0.25</strong> of its audited records" in capped
    assert "inconclusive does not allow approval" in capped


def test_the_draft_form_offers_validates_and_keeps_the_terms(cast):
    client = cast.client_for("admin")
    url = reverse("consortium:agreement-create", kwargs={"slug": cast.consortium.slug})
    form = client.get(url).content.decode().replace("&#x27;", "'")
    assert "Require each site's privacy audit before approval" in form
    assert "1 is an exact copy; around 0.3 a reconstruction is hard to recognise" in form
    assert "A maximum needs the audit: tick the box above too." in form
    # A maximum without the box: refused beside the field, nothing drafted.
    refused = client.post(url, form_data(title="Capped DUA", audit_max_median_ssim="0.3"))
    assert refused.status_code == 200
    assert refused.context["form"].errors["audit_max_median_ssim"] == [MAXIMUM_NEEDS_AUDIT]
    assert not AgreementVersion.objects.filter(agreement__title="Capped DUA").exists()
    response = client.post(
        url,
        form_data(
            title="Capped DUA",
            privacy_audit_required="on",
            audit_max_median_ssim="0.3",
            audit_max_success_rate="",
        ),
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    version = AgreementVersion.objects.get(agreement__title="Capped DUA")
    assert (version.privacy_audit_required, version.audit_max_median_ssim) == (True, Decimal("0.3"))
    assert version.audit_max_success_rate is None
    edit = reverse(
        "consortium:version-edit",
        kwargs={"slug": cast.consortium.slug, "pk": version.agreement_id, "number": 1},
    )
    initial = client.get(edit).context["form"].initial
    assert [initial[name] for name in AUDIT_TERMS] == [True, Decimal("0.3"), None]
    # The edit form posts every field: an emptied maximum is removed.
    response = client.post(
        edit, form_data(privacy_audit_required="on", audit_max_success_rate="0.5")
    )
    assert response.status_code == 302
    version.refresh_from_db()
    assert [getattr(version, name) for name in AUDIT_TERMS] == [True, None, Decimal("0.5")]


def test_the_api_reads_writes_and_validates_the_terms(cast):
    client = APIClient()
    client.force_authenticate(cast.admin)
    body = {
        "consortium": cast.consortium.slug,
        "title": "API DUA",
        **{k: str(v) if not isinstance(v, list) else v for k, v in TERMS.items()},
    }
    bad = client.post("/api/agreements/", {**body, "audit_max_median_ssim": "0.3"}, format="json")
    assert bad.status_code == 400
    assert MAXIMUM_NEEDS_AUDIT in json.dumps(bad.json()["audit_max_median_ssim"])
    created = client.post("/api/agreements/", body, format="json")
    assert created.status_code == 201, created.json()
    version = AgreementVersion.objects.get(agreement__title="API DUA")
    url = f"/api/agreement-versions/{version.pk}/"
    read = client.get(url).json()
    assert [read[name] for name in AUDIT_TERMS] == [False, None, None]
    lone = client.patch(url, {"audit_max_success_rate": "0.25"}, format="json")
    assert lone.status_code == 400
    assert MAXIMUM_NEEDS_AUDIT in json.dumps(lone.json())
    changed = client.patch(
        url,
        {"privacy_audit_required": True, "audit_max_success_rate": "0.25"},
        format="json",
    )
    assert changed.status_code == 200, changed.json()
    read = client.get(url).json()
    assert [read[name] for name in AUDIT_TERMS] == [True, None, "0.250"]
    client.patch(url, {"purpose": "Another purpose."}, format="json")  # left out: unchanged
    version.refresh_from_db()
    assert version.audit_max_success_rate == Decimal("0.25")
    cleared = client.patch(url, {"audit_max_success_rate": None}, format="json")  # null clears
    assert cleared.status_code == 200, cleared.json()
    version.refresh_from_db()
    assert (version.privacy_audit_required, version.audit_max_success_rate) == (True, None)


def test_the_compliance_report_carries_the_terms(cast):
    capped = agreement_in_force(
        cast, title="Capped", privacy_audit_required=True, audit_max_median_ssim="0.3"
    )
    scope = ComplianceScope(cast.consortium.slug, capped.agreement_id, capped.number)
    doc = ComplianceReport(scope, ledger_head()).document()
    terms = doc["terms"] if isinstance(doc["terms"], dict) else json.loads(doc["terms"])
    assert (terms["privacy_audit_required"], terms["audit_max_median_ssim"]) == (True, "0.3")
    said = _later_terms_text(terms)
    assert "Privacy audit before approval: required" in said
    assert "Highest median SSIM an institution may approve: 0.3" in said
    assert "success" not in said  # no success-rate maximum in this version
    # A version without the audit reads as before the term existed.
    assert _later_terms_text({}) == (
        "Central validation set: not allowed. Who may download the final model: Members of "
        "the participating institutions and the consortium's administrators."
    )
