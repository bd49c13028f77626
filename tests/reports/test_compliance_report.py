"""The compliance report of an agreement version (issue 14): what it says, from the ledger.

The history planted here is made with the real services (agreement, signatures, proposals,
approvals, a refusal, a withdrawal); the accepted updates are ledger entries in the shape the
site API writes them (as the contribution-report fixtures do).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from pypdf import PdfReader

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry
from audit.models import LedgerEntry
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import ComplianceScope
from audit.reports.compliance_files import compliance_bytes, read_compliance_document
from audit.reports.compliance_pdf import _later_terms_text
from audit.reports.compliance_services import compliance_export
from audit.reports.scope import ledger_head
from consortium.governance.services.institutions import institution_update
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import agreement_in_force
from tests.support.training_pages import default_pipeline_spec, steward_registers_datasets
from training.jobs.accounting import PrivacyEvent, epsilon_spent
from training.jobs.approvals import approval_decide
from training.jobs.compliance import ComplianceError
from training.jobs.proposals import job_propose

pytestmark = pytest.mark.django_db

GAUSSIAN = {
    "mechanism": "gaussian",
    "params": {"noise_multiplier": 1.1},
    "count": 1,
    "source": "gaussian_noise",
}
NO_NOISE = [{"filter": "percentile_clipping", "percentile": 95}]
REJECTION = "The cohort overlaps a running trial."
WITHDRAWAL = "The ethics board revoked the data-use approval."


@dataclass
class History:
    cast: object
    version: object
    job: object
    rejected: object
    scope: ComplianceScope


def plant_history(cast) -> History:
    version = agreement_in_force(cast, title="Tumour study agreement")
    steward_registers_datasets(cast)
    job = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Tumours",
        spec=default_pipeline_spec(cast),
    )
    approval_decide(
        acting_user=cast.approver,
        job=job,
        institution=cast.hospital_a,
        decision="approved",
        spec_digest=job.spec_digest,
        agreement_version_id=job.agreement_version_id,
    )
    rejected = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Second look",
        spec=default_pipeline_spec(cast),
    )
    approval_decide(
        acting_user=cast.approver_b,
        job=rejected,
        institution=cast.hospital_b,
        decision="rejected",
        spec_digest=rejected.spec_digest,
        agreement_version_id=rejected.agreement_version_id,
        reason=REJECTION,
    )
    with pytest.raises(ComplianceError):
        job_propose(
            acting_user=cast.researcher,
            consortium=cast.consortium,
            title="No noise",
            spec=default_pipeline_spec(cast, privacy_pipeline=NO_NOISE),
        )
    for round_index in (1, 2):
        append_entry(
            event="round.update_accepted",
            actor_repr="site hospital-a worker",
            subject=job,
            consortium_slug=cast.consortium.slug,
            institution_slug="hospital-a",
            payload={
                "job_id": job.pk,
                "round": round_index,
                "site": "hospital-a",
                "update_digest": f"u{round_index}",
                "samples": 300,
                "privacy_events": [GAUSSIAN],
            },
        )
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=version.agreement,
        institution=cast.hospital_b,
        reason=WITHDRAWAL,
    )
    scope = ComplianceScope(cast.consortium.slug, version.agreement_id, version.number)
    return History(cast, version, job, rejected, scope)


@pytest.fixture
def history(cast):
    return plant_history(cast)


def document(history):
    return ComplianceReport(history.scope, ledger_head()).document()


def test_the_report_lists_the_jobs_run_under_the_version_with_their_bound_specs(history):
    doc = document(history)
    jobs = {j["job_id"]: j for j in doc["jobs"]}
    assert set(jobs) == {history.job.pk, history.rejected.pk}
    job = jobs[history.job.pk]
    assert job["title"] == "Tumours"
    assert job["spec_digest"] == history.job.spec_digest
    assert job["spec_matches_ledger"] is True
    assert job["participants"] == "hospital-a hospital-b"
    assert job["state"] == "failed"  # hospital B withdrew: fewer than the minimum remained
    assert jobs[history.rejected.pk]["state"] == "rejected"
    assert doc["version_digest"] == history.version.content_digest
    assert doc["agreement_title"] == "Tumour study agreement"


def test_each_approval_says_who_decided_when_and_bound_to_which_spec_digest(history):
    doc = document(history)
    approval = next(a for a in doc["approvals"] if a["job_id"] == history.job.pk)
    assert approval["institution"] == "hospital-a"
    assert approval["institution_name"] == history.cast.hospital_a.name
    assert approval["decision"] == "approved"
    assert approval["decided_by"] == history.cast.approver.get_username() or approval["decided_by"]
    entry = LedgerEntry.objects.get(seq=approval["ledger_seq"])
    assert entry.event == "job.decision"
    assert approval["decided_by"] == entry.actor_repr
    assert approval["at"].endswith("Z") and approval["at"].startswith(
        entry.created_at.strftime("%Y-%m-%dT%H:%M:%S")
    )
    assert approval["spec_digest"] == history.job.spec_digest
    assert approval["agreement_version"] == history.version.number
    assert approval["bound_to_current_spec"] is True


def test_the_privacy_floor_is_checked_against_each_jobs_filters(history):
    doc = document(history)
    filters = [f for f in doc["filters"] if f["job_id"] == history.job.pk]
    assert [f["filter"] for f in filters] == [
        "partial_sharing",
        "percentile_clipping",
        "gaussian_noise",
    ]
    assert [f["step"] for f in filters] == [1, 2, 3]
    assert json.loads(filters[2]["params"])["noise_multiplier"] == 4.0
    checks = {c["term"]: c for c in doc["floor_checks"] if c["job_id"] == history.job.pk}
    assert checks["required_dp_mechanism"]["required"] == "gaussian"
    assert checks["required_dp_mechanism"]["job_value"] == "gaussian"
    assert checks["required_dp_mechanism"]["ok"] is True
    assert checks["max_shared_fraction"]["required"] == "at most 0.4"
    assert checks["max_shared_fraction"]["job_value"] == "0.4"
    assert checks["max_shared_fraction"]["ok"] is True


def test_a_spec_that_no_longer_hashes_to_the_ledgers_digest_is_flagged(history):
    from training.models import TrainingJob

    TrainingJob.objects.filter(pk=history.job.pk).update(
        spec_text=json.dumps(default_pipeline_spec(history.cast, privacy_pipeline=NO_NOISE))
    )
    doc = document(history)
    job = next(j for j in doc["jobs"] if j["job_id"] == history.job.pk)
    assert job["spec_matches_ledger"] is False


def test_epsilon_spent_per_institution_is_against_its_cap(history):
    doc = document(history)
    rows = {p["institution"]: p for p in doc["privacy"]}
    assert set(rows) == {"hospital-a", "hospital-b"}
    expected = epsilon_spent([PrivacyEvent("gaussian", {"noise_multiplier": 1.1}, 2)], delta=1e-5)
    assert rows["hospital-a"]["epsilon_spent"] == pytest.approx(expected, rel=1e-9)
    assert rows["hospital-a"]["epsilon_total"] == pytest.approx(expected, rel=1e-9)
    assert rows["hospital-a"]["epsilon_cap"] == 8.0 and rows["hospital-a"]["delta"] == 1e-5
    assert rows["hospital-a"]["within_cap"] is (expected <= 8.0)
    assert rows["hospital-a"]["institution_name"] == history.cast.hospital_a.name
    assert rows["hospital-b"]["epsilon_spent"] == 0.0


def test_a_renamed_institution_is_named_as_the_ledger_renamed_it(history):
    # institution_update records the new name as the plain value of changes.name: the report
    # once read only {"old", "new"} pairs and kept the first name.
    institution_update(
        acting_user=history.cast.admin, institution=history.cast.hospital_a, name="St Anne's"
    )
    rows = {p["institution"]: p for p in document(history)["privacy"]}
    assert rows["hospital-a"]["institution_name"] == "St Anne's"


def test_a_withdrawal_is_listed_with_what_it_changed(history):
    doc = document(history)
    [withdrawal] = doc["withdrawals"]
    assert withdrawal["institution"] == "hospital-b"
    assert withdrawal["institution_name"] == history.cast.hospital_b.name
    assert withdrawal["detail"] == WITHDRAWAL
    effects = [(e["job_id"], e["effect"]) for e in doc["withdrawal_effects"]]
    assert effects == [
        (history.job.pk, "taken out of the job"),
        (history.job.pk, "job failed"),
    ]
    assert {e["cause_seq"] for e in doc["withdrawal_effects"]} == {withdrawal["ledger_seq"]}
    assert {e["cause_agreement_id"] for e in doc["withdrawal_effects"]} == {
        history.version.agreement_id
    }


def test_rejected_and_refused_proposals_are_listed_with_their_reasons(history):
    doc = document(history)
    refused = [r for r in doc["refusals"] if r["kind"] == "refused"]
    rejected = [r for r in doc["refusals"] if r["kind"] == "rejected"]
    assert [r["title"] for r in refused] == ["No noise"]
    assert "dp_mechanism" in refused[0]["detail"]
    assert "Gaussian" in refused[0]["detail"]
    assert [(r["job_id"], r["institution"], r["detail"]) for r in rejected] == [
        (history.rejected.pk, "hospital-b", REJECTION)
    ]
    assert rejected[0]["institution_name"] == history.cast.hospital_b.name


def test_the_report_names_the_ledger_head_it_was_built_from(history):
    head = ledger_head()
    doc = document(history)
    assert doc["ledger_head"] == head.to_json()
    append_entry(event="unrelated.thing", consortium_slug=history.cast.consortium.slug)
    assert document(history)["ledger_head"]["seq"] == head.seq + 1
    # A report made at the earlier head is the same, whatever came after.
    again = ComplianceReport(history.scope, head).document()
    assert again == doc


def test_another_agreements_version_does_not_list_these_jobs(history):
    other = agreement_in_force(history.cast, title="Imaging agreement")
    scope = ComplianceScope(history.cast.consortium.slug, other.agreement_id, other.number)
    doc = ComplianceReport(scope, ledger_head()).document()
    assert doc["jobs"] == [] and doc["approvals"] == [] and doc["withdrawals"] == []


def test_an_unpublished_or_unknown_version_is_a_clear_error(history):
    from audit.reports.errors import ReportError

    scope = ComplianceScope(history.cast.consortium.slug, history.version.agreement_id, 9)
    with pytest.raises(ReportError, match="no published version 9"):
        ComplianceReport(scope, ledger_head()).document()


# --- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_each_format_reads_back_to_the_same_document(history, fmt):
    report = ComplianceReport(history.scope, ledger_head())
    data = compliance_bytes(report, fmt)
    found, doc = read_compliance_document(data)
    assert found == fmt
    assert doc == report.document()
    assert compliance_bytes(report, fmt) == data  # the same head gives the same bytes


def test_the_pdf_names_hospitals_by_name_and_writes_epsilon(history):
    data = compliance_bytes(ComplianceReport(history.scope, ledger_head()), "pdf")
    text = "".join(page.extract_text() for page in PdfReader(io.BytesIO(data)).pages)
    assert history.cast.hospital_a.name in text and history.cast.hospital_b.name in text
    assert "ε" in text and "epsilon" not in text.lower()
    assert "Compliance report" in text and REJECTION in text
    # The later terms, in words, their absence read as their defaults.
    assert "Central validation set: not allowed." in " ".join(text.split())
    assert "Who may download the final model: Members of the participating" in " ".join(
        text.split()
    )


def test_the_pdf_states_the_later_terms_a_version_sets():
    said = _later_terms_text(
        {"final_model_access": "nobody", "allows_central_validation_set": True}
    )
    assert said == (
        "Central validation set: allowed. Who may download the final model: Nobody: the model "
        "stays on the consortium's server."
    )


# --- export and verification ----------------------------------------------------------------------


def verify(path) -> tuple[int, str]:
    out = io.StringIO()
    try:
        call_command("verify_report", str(path), stdout=out)
    except CommandError as exc:
        return exc.returncode, out.getvalue() + str(exc)
    return 0, out.getvalue()


def export_to(history, tmp_path, fmt):
    path = tmp_path / f"compliance.{fmt}"
    with open(path, "wb") as out:
        result = compliance_export(
            acting_user=history.cast.auditor,
            scope=history.scope,
            fmt=fmt,
            out=out,
            subject=history.version,
        )
    return path, result


@pytest.mark.parametrize("fmt", ["csv", "json", "pdf"])
def test_an_export_is_a_ledger_entry_and_verify_report_accepts_it(history, tmp_path, fmt):
    path, result = export_to(history, tmp_path, fmt)
    entry = LedgerEntry.objects.get(seq=result.entry.seq)
    assert entry.event == ledger_events.COMPLIANCE_EXPORTED == "report.compliance_exported"
    payload = json.loads(entry.payload_text)
    assert payload["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert payload["format"] == fmt and payload["scope"] == history.scope.to_json()
    assert payload["ledger_head"]["seq"] == entry.seq - 1
    assert entry.subject_type == "consortium.agreementversion"
    code, text = verify(path)
    assert code == 0, text
    assert "compliance report" in text
    assert "every figure matches the ledger" in text
    assert f"byte for byte the {fmt.upper()}" in text
    assert f"ledger entry #{entry.seq}" in text


def test_a_tampered_json_fails_and_names_the_figure(history, tmp_path):
    path, _ = export_to(history, tmp_path, "json")
    doc = json.loads(path.read_text())
    doc["refusals"][0]["detail"] = "no reason"
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    code, text = verify(path)
    assert code == 1
    assert "DIFFERS" in text and "detail" in text


def test_a_tampered_csv_epsilon_fails(history, tmp_path):
    path, _ = export_to(history, tmp_path, "csv")
    lines = path.read_text().split("\r\n")
    index = next(i for i, line in enumerate(lines) if ",privacy," in line)
    lines[index] = lines[index].replace(",8.0,", ",80.0,")
    path.write_text("\r\n".join(lines))
    code, text = verify(path)
    assert code == 1 and "epsilon_cap" in text


def test_a_pdf_whose_pages_were_changed_fails(history, tmp_path):
    path, _ = export_to(history, tmp_path, "pdf")
    data = path.read_bytes()
    # Change the visible text (the page stream is compressed: change the document's title
    # metadata instead, which is outside the embedded figures).
    tampered = data.replace(b"(Compliance report: agreement", b"(Compliance report: agreemenT")
    assert tampered != data
    path.write_bytes(tampered)
    code, text = verify(path)
    assert code == 1 and "its pages differ" in text


def test_a_report_naming_a_head_the_ledger_does_not_have_fails(history, tmp_path):
    path, _ = export_to(history, tmp_path, "json")
    doc = json.loads(path.read_text())
    doc["ledger_head"]["entry_hash"] = "0" * 64
    path.write_text(json.dumps(doc, indent=2, sort_keys=True))
    code, text = verify(path)
    assert code == 1 and "head hash" in text


def test_a_withdrawal_from_another_agreement_is_not_this_versions(cast):
    """Consent is per agreement: hospital B's withdrawal from a second agreement is neither a
    withdrawal under the first nor a change to the first agreement's jobs."""
    version = agreement_in_force(cast, title="Tumour study agreement")
    steward_registers_datasets(cast)
    job = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Tumours",
        spec=default_pipeline_spec(cast),
    )
    other = agreement_in_force(cast, title="Imaging agreement")
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=other.agreement,
        institution=cast.hospital_b,
        reason=WITHDRAWAL,
    )
    scope = ComplianceScope(cast.consortium.slug, version.agreement_id, version.number)
    doc = ComplianceReport(scope, ledger_head()).document()
    assert [j["job_id"] for j in doc["jobs"]] == [job.pk]
    assert doc["withdrawals"] == [] and doc["withdrawal_effects"] == []
    other_scope = ComplianceScope(cast.consortium.slug, other.agreement_id, other.number)
    other_doc = ComplianceReport(other_scope, ledger_head()).document()
    assert [w["institution"] for w in other_doc["withdrawals"]] == ["hospital-b"]
    assert other_doc["withdrawal_effects"] == []
