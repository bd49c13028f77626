"""The compliance report's page and exports (issue 14): who may see it, the link to it from the
agreement version's page, and each export recorded in the ledger."""

from __future__ import annotations

import hashlib
import json

import pytest
from django.urls import reverse

from audit.models import LedgerEntry
from audit.reports.compliance_files import read_compliance_document
from audit.reports.scope import ledger_head
from tests.reports.test_compliance_report import REJECTION, WITHDRAWAL, plant_history

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(cast):
    return plant_history(cast)


def report_url(history, number=None):
    version = history.version
    return reverse(
        "audit:compliance-report",
        args=[history.cast.consortium.slug, version.agreement_id, number or version.number],
    )


def version_url(history):
    version = history.version
    return reverse(
        "consortium:version-detail",
        args=[history.cast.consortium.slug, version.agreement_id, version.number],
    )


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


@pytest.mark.parametrize("role", ["auditor", "admin"])
def test_auditors_and_administrators_see_the_report(history, role):
    response = history.cast.client_for(role).get(report_url(history))
    assert response.status_code == 200
    html = response.content.decode()
    head = ledger_head()
    assert head.entry_hash in html and f'name="head" value="{head.seq}"' in html
    assert history.cast.hospital_b.name in html
    assert WITHDRAWAL in html and REJECTION in html
    assert "Tumours" in html and "gaussian_noise" in html
    for fmt in ("csv", "json", "pdf"):
        assert f'value="{fmt}"' in html


@pytest.mark.parametrize("role", ["outsider", "approver", "researcher", "steward"])
def test_others_get_the_same_404_as_for_a_missing_version(history, role):
    client = history.cast.client_for(role)
    assert client.get(report_url(history)).status_code == 404
    assert client.post(report_url(history), {"format": "csv"}).status_code == 404
    assert not LedgerEntry.objects.filter(event="report.compliance_exported").exists()


def test_a_missing_version_is_a_404(history):
    assert history.cast.client_for("auditor").get(report_url(history, 7)).status_code == 404


def test_anonymous_is_sent_to_sign_in(history, client):
    response = client.get(report_url(history))
    assert response.status_code == 302 and "login" in response["Location"]


def test_the_version_page_links_to_the_report_only_for_those_who_may_see_it(history):
    auditor_page = history.cast.client_for("auditor").get(version_url(history)).content.decode()
    assert report_url(history) in auditor_page and "Compliance report" in auditor_page
    approver_page = history.cast.client_for("approver").get(version_url(history))
    assert approver_page.status_code == 200
    assert report_url(history) not in approver_page.content.decode()


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_each_export_is_recorded_in_the_ledger_with_its_digest(history, fmt):
    client = history.cast.client_for("auditor")
    head = ledger_head()
    response = client.post(report_url(history), {"format": fmt, "head": str(head.seq)})
    assert response.status_code == 200
    data = body_of(response)
    digest = hashlib.sha256(data).hexdigest()
    assert response["X-Report-SHA256"] == digest
    assert f"ledger-{head.seq}.{fmt}" in response["Content-Disposition"]
    found, doc = read_compliance_document(data)
    assert found == fmt and doc["ledger_head"] == head.to_json()
    entry = LedgerEntry.objects.get(seq=int(response["X-Ledger-Entry"]))
    assert entry.event == "report.compliance_exported"
    assert entry.actor == history.cast.auditor
    assert entry.subject_id == str(history.version.pk)
    payload = json.loads(entry.payload_text)
    assert payload["sha256"] == digest and payload["ledger_head"]["seq"] == head.seq
    # Every export is its own entry.
    client.post(report_url(history), {"format": fmt, "head": str(head.seq)})
    assert LedgerEntry.objects.filter(event="report.compliance_exported").count() == 2


@pytest.mark.parametrize("data", [{"format": "xls"}, {}, {"format": "csv", "head": "abc"}])
def test_a_bad_export_request_says_so_and_records_nothing(history, data):
    client = history.cast.client_for("auditor")
    response = client.post(report_url(history), data, follow=True)
    assert "Choose CSV, JSON or PDF" in response.content.decode()
    assert not LedgerEntry.objects.filter(event="report.compliance_exported").exists()


def test_a_head_that_is_not_in_the_ledger_is_refused(history):
    client = history.cast.client_for("auditor")
    response = client.post(report_url(history), {"format": "csv", "head": "99999"}, follow=True)
    assert "the ledger has no entry #99999" in response.content.decode()
    assert not LedgerEntry.objects.filter(event="report.compliance_exported").exists()


def test_the_ledger_page_lists_each_versions_compliance_report(history):
    page = history.cast.client_for("auditor").get(
        reverse("audit:ledger", args=[history.cast.consortium.slug])
    )
    html = page.content.decode()
    assert report_url(history) in html
    assert f"Compliance report: Tumour study agreement, version {history.version.number}" in html
