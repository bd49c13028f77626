"""The auditor's report pages: the summary at the current head, and the three exports."""

from __future__ import annotations

import hashlib
import io
import json

import pytest
from django.urls import reverse
from pypdf import PdfReader

from audit.ledger.chain import append_entry
from audit.models import LedgerEntry
from audit.reports.files import read_document
from audit.reports.scope import ledger_head
from tests.support.report_fixtures import plant

pytestmark = pytest.mark.django_db


@pytest.fixture
def planted(cast):
    return plant(cast)


def job_report_url(p):
    return reverse("audit:job-report", args=[p.cast.consortium.slug, p.job.pk])


def institution_report_url(p, slug="hospital-b"):
    return reverse("audit:institution-report", args=[p.cast.consortium.slug, slug])


def body_of(response) -> bytes:
    return b"".join(response.streaming_content)


def test_the_auditor_sees_each_hospitals_contribution_and_privacy_spent(planted):
    response = planted.cast.client_for("auditor").get(job_report_url(planted))
    assert response.status_code == 200
    html = response.content.decode()
    head = ledger_head()
    assert head.entry_hash in html and f"#{head.seq}" in html
    rows = {r["institution"]: r for r in response.context["summary"]}
    assert set(rows) == {"hospital-a", "hospital-b"}
    assert rows["hospital-a"]["samples"] == 900
    assert f"{rows['hospital-b']['epsilon_total']:.4f}" in html
    assert "over the cap" in html  # hospital A's total is over its cap of 8
    assert "the board revoked" in html  # the withdrawal
    for fmt in ("csv", "json", "pdf"):
        assert f'value="{fmt}"' in html
    assert f'name="head" value="{head.seq}"' in html


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_each_export_names_its_head_and_is_recorded_with_its_digest(planted, fmt):
    client = planted.cast.client_for("auditor")
    head = ledger_head()
    response = client.post(job_report_url(planted), {"format": fmt, "head": str(head.seq)})
    assert response.status_code == 200
    data = body_of(response)
    digest = hashlib.sha256(data).hexdigest()
    assert response["X-Report-SHA256"] == digest
    assert response["X-Ledger-Head"] == f"{head.seq} {head.entry_hash}"
    assert f"ledger-{head.seq}.{fmt}" in response["Content-Disposition"]
    found_fmt, doc = read_document(data)
    assert found_fmt == fmt
    assert doc["ledger_head"] == head.to_json()
    entry = LedgerEntry.objects.get(seq=int(response["X-Ledger-Entry"]))
    assert entry.event == "report.exported" and entry.actor == planted.cast.auditor
    assert entry.subject_id == str(planted.job.pk)
    payload = json.loads(entry.payload_text)
    assert payload["sha256"] == digest and payload["ledger_head"]["seq"] == head.seq
    if fmt == "pdf":
        assert len(PdfReader(io.BytesIO(data)).pages) == 2


def test_the_export_is_made_from_the_head_the_page_showed(planted):
    client = planted.cast.client_for("auditor")
    shown = ledger_head()
    append_entry(
        event="round.update_rejected",
        consortium_slug=planted.cast.consortium.slug,
        institution_slug="hospital-a",
        payload={"job_id": planted.job.pk, "round": 4, "site": "hospital-a", "reason": "late"},
    )
    response = client.post(job_report_url(planted), {"format": "json", "head": str(shown.seq)})
    _, doc = read_document(body_of(response))
    assert doc["ledger_head"]["seq"] == shown.seq
    assert [r["updates_rejected"] for r in doc["summary"]] == [0, 1]


def test_an_institutions_approver_exports_its_own_report(planted):
    client = planted.cast.client_for("approver_b")
    page = client.get(institution_report_url(planted))
    assert page.status_code == 200
    response = client.post(institution_report_url(planted), {"format": "csv"})
    assert response.status_code == 200
    _, doc = read_document(body_of(response))
    assert doc["scope"]["institution"] == "hospital-b"
    assert [d["round"] for d in doc["derived_models"]] == [2, 3]
    entry = LedgerEntry.objects.get(seq=int(response["X-Ledger-Entry"]))
    assert entry.institution_slug == "hospital-b" and entry.subject_type == "consortium.institution"
    # ...but not hospital A's.
    assert client.get(institution_report_url(planted, "hospital-a")).status_code == 404


@pytest.mark.parametrize("data", [{"format": "xls"}, {}, {"format": "csv", "head": "abc"}])
def test_a_bad_export_request_says_so_and_records_nothing(planted, data):
    client = planted.cast.client_for("auditor")
    response = client.post(job_report_url(planted), data, follow=True)
    assert "Choose CSV, JSON or PDF" in response.content.decode()
    assert not LedgerEntry.objects.filter(event="report.exported").exists()


def test_a_head_that_is_not_in_the_ledger_is_refused(planted):
    client = planted.cast.client_for("auditor")
    response = client.post(job_report_url(planted), {"format": "csv", "head": "99999"}, follow=True)
    assert "the ledger has no entry #99999" in response.content.decode()
    assert not LedgerEntry.objects.filter(event="report.exported").exists()


@pytest.mark.parametrize(
    ("who", "on_job", "on_institution"),
    [
        ("auditor", True, True),
        ("admin", True, True),
        ("approver_b", False, True),
        ("other_member", False, False),
    ],
)
def test_the_job_and_institution_pages_link_the_report_to_those_allowed(
    planted, who, on_job, on_institution
):
    client = planted.cast.client_for(who)
    slug = planted.cast.consortium.slug
    job_page = client.get(reverse("training:job-detail", args=[slug, planted.job.pk]))
    assert (job_report_url(planted) in job_page.content.decode()) is on_job
    page = client.get(reverse("consortium:institution-detail", args=[slug, "hospital-b"]))
    assert (institution_report_url(planted) in page.content.decode()) is on_institution
