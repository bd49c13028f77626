"""The reports follow a job to the agreement version the ledger says it was bound to, and a
refusal to the version it was checked against (issue 14).

* ``job.proposal_refused`` names the version the proposal was checked against; the compliance
  report lists a refusal under that version, not under whatever version was published last
  (which may be another agreement's, not yet in force). Older entries, which name none, are
  still attributed to the version published most recently before them.
* ``job.agreement_rebound`` names the old and new agreements: a job is rebound to the newest
  agreement in force, which may be another agreement. The compliance report lists the job under
  the new agreement's version, and a contribution report flags the job's models only for a
  withdrawal under the agreement the job ended up under. Older entries, which name only version
  numbers, are still read within the job's agreement.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, verify_chain
from audit.models import LedgerEntry
from audit.reports.build import build_report
from audit.reports.compliance import ComplianceReport
from audit.reports.compliance_contents import ComplianceScope
from audit.reports.scope import job_scope, ledger_head
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import agreement_in_force, amend, publish_agreement
from tests.support.report_fixtures import GAUSSIAN
from tests.support.training_pages import default_pipeline_spec, steward_registers_datasets
from training.jobs.approvals import approval_decide
from training.jobs.compliance import ComplianceError
from training.jobs.proposals import job_propose

pytestmark = pytest.mark.django_db

NO_NOISE = [{"filter": "percentile_clipping", "percentile": 95}]


@pytest.fixture(autouse=True)
def _ledger_stays_verifiable(db):
    yield
    result = verify_chain()
    assert result.ok, result.summary()


def compliance_doc(cast, version) -> dict:
    scope = ComplianceScope(cast.consortium.slug, version.agreement_id, version.number)
    return ComplianceReport(scope, ledger_head()).document()


def payloads(event: str) -> list[dict]:
    rows = LedgerEntry.objects.filter(event=event).order_by("seq")
    return [json.loads(row.payload_text) for row in rows]


def propose(cast, title: str = "Tumours", **spec):
    return job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title=title,
        spec=default_pipeline_spec(cast, **spec),
    )


def refuse(cast, title: str = "No noise"):
    with pytest.raises(ComplianceError):
        propose(cast, title, privacy_pipeline=NO_NOISE)


# --- refusals -------------------------------------------------------------------------------


def test_a_refusal_names_the_version_it_was_checked_against(cast):
    tumour = agreement_in_force(cast, title="Tumour DUA")
    steward_registers_datasets(cast)
    refuse(cast)

    [payload] = payloads(ledger_events.JOB_PROPOSAL_REFUSED)
    assert payload["agreement_version"] == tumour.number
    assert payload["agreement_digest"] == tumour.content_digest


def test_a_refusal_is_listed_under_the_version_in_force_not_the_last_published(cast):
    """A second agreement published but signed by nobody is not in force: a proposal refused
    meanwhile was checked against the first agreement, and is that version's refusal."""
    tumour = agreement_in_force(cast, title="Tumour DUA")
    steward_registers_datasets(cast)
    imaging = publish_agreement(cast, title="Imaging DUA")  # published last, not in force
    refuse(cast)

    refused = [r["title"] for r in compliance_doc(cast, tumour)["refusals"]]
    assert refused == ["No noise"]
    assert compliance_doc(cast, imaging)["refusals"] == []


def test_an_older_refusal_naming_no_version_goes_to_the_last_published(cast):
    """Entries written before refusals named their version keep today's attribution."""
    tumour = agreement_in_force(cast, title="Tumour DUA")
    imaging = publish_agreement(cast, title="Imaging DUA")
    append_entry(
        event=ledger_events.JOB_PROPOSAL_REFUSED,
        actor=cast.researcher,
        consortium_slug=cast.consortium.slug,
        payload={
            "job_id": None,
            "title": "Old refusal",
            "spec_digest": hashlib.sha256(b"spec").hexdigest(),
            "problems": [],
        },
    )

    assert [r["title"] for r in compliance_doc(cast, imaging)["refusals"]] == ["Old refusal"]
    assert compliance_doc(cast, tumour)["refusals"] == []


# --- rebinding to another agreement -----------------------------------------------------------


@pytest.fixture
def rebound(cast):
    """A job proposed under the tumour agreement (v1), then rebound, at its first decision, to
    version 1 of an imaging agreement that came into force after it (the newest in force).
    Hospital B's updates then went into two rounds' models."""
    tumour = agreement_in_force(cast, title="Tumour DUA")
    steward_registers_datasets(cast)
    job = propose(cast)
    imaging = agreement_in_force(cast, title="Imaging DUA")
    approval_decide(
        acting_user=cast.approver,
        job=job,
        institution=cast.hospital_a,
        decision="approved",
        spec_digest=job.spec_digest,
        agreement_version_id=imaging.pk,
    )
    job.refresh_from_db()
    assert job.agreement_version_id == imaging.pk
    for index in (1, 2):
        plant_round_of_b(cast, job, index)
    return cast, job, tumour, imaging


def plant_round_of_b(cast, job, index: int) -> None:
    """Round ``index``: hospital B's update accepted, and the model built from it alone."""
    where = {"subject": job, "consortium_slug": cast.consortium.slug}
    update = {"job_id": job.pk, "round": index, "site": "hospital-b", "update_digest": f"u{index}"}
    spend = {"samples": 200, "privacy_events": [GAUSSIAN]}
    append_entry(
        event="round.update_accepted",
        actor_repr="site hospital-b worker",
        institution_slug="hospital-b",
        payload=update | spend,
        **where,
    )
    model = {"global_digest": f"model {index}", "lineage_hash": f"lineage {index}"}
    append_entry(
        event="round.closed",
        payload={
            "job_id": job.pk,
            "round": index,
            "parent_lineage_hash": f"lineage {index - 1}",
            "sites": {"hospital-b": f"u{index}"},
            **model,
        },
        **where,
    )


def withdraw_b(cast, version, reason):
    consent_withdraw(
        acting_user=cast.approver_b,
        agreement=version.agreement,
        institution=cast.hospital_b,
        reason=reason,
    )


def test_the_rebound_entry_names_both_agreements(rebound):
    cast, job, tumour, imaging = rebound
    [payload] = payloads(ledger_events.JOB_AGREEMENT_REBOUND)
    assert payload == {
        "job_id": job.pk,
        "old_version": tumour.number,
        "new_version": imaging.number,
        "old_agreement_id": tumour.agreement_id,
        "new_agreement_id": imaging.agreement_id,
    }


def test_the_compliance_report_lists_a_rebound_job_under_its_new_agreement(rebound):
    cast, job, tumour, imaging = rebound
    assert [j["job_id"] for j in compliance_doc(cast, imaging)["jobs"]] == [job.pk]
    assert compliance_doc(cast, tumour)["jobs"] == []


def test_a_withdrawal_under_the_old_agreement_flags_no_model_of_a_rebound_job(rebound):
    cast, job, tumour, imaging = rebound
    withdraw_b(cast, tumour, "We leave the tumour study.")

    doc = build_report(job_scope(job.pk)).document()

    assert doc["withdrawals"] == []
    assert doc["derived_models"] == []


def test_a_withdrawal_under_the_new_agreement_flags_the_rebound_jobs_models(rebound):
    cast, job, tumour, imaging = rebound
    withdraw_b(cast, imaging, "We leave the imaging study.")

    doc = build_report(job_scope(job.pk)).document()

    assert [w["detail"] for w in doc["withdrawals"]] == ["We leave the imaging study."]
    assert [(d["institution"], d["round"]) for d in doc["derived_models"]] == [
        ("hospital-b", 1),
        ("hospital-b", 2),
    ]


def test_an_older_rebound_entry_naming_no_agreement_stays_within_the_jobs_agreement(cast):
    """Entries written before the event named agreements are read as before: the new version
    number is a version of the job's own agreement."""
    tumour = agreement_in_force(cast, title="Tumour DUA")
    steward_registers_datasets(cast)
    job = propose(cast)
    amended = amend(cast, tumour, purpose="Train tumour classifiers and nothing else.")
    append_entry(
        event=ledger_events.JOB_AGREEMENT_REBOUND,
        actor=cast.approver,
        subject=job,
        consortium_slug=cast.consortium.slug,
        payload={"job_id": job.pk, "old_version": tumour.number, "new_version": amended.number},
    )

    assert [j["job_id"] for j in compliance_doc(cast, amended)["jobs"]] == [job.pk]
    assert compliance_doc(cast, tumour)["jobs"] == []
