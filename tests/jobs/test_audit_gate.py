"""The privacy audit before approval, on the agreement's side: a job must ask for the audit
when the agreement requires it (compliance), an institution may approve only once its own
audit of the job's current spec is in and, under the agreement's maxima, measured, conclusive
and within them (the approval gate, ``training.jobs.audit_gate``); rejecting is never gated.
The proposal form asks for the audit and keeps it on an edit, and the review page says why an
approval was refused.

The audits are written here as the intake leaves them (``status`` reported, ``outcome``, a
``summary`` made by ``training.fl.audit_report.summary_of``), so each branch is reached without
a site worker."""

from __future__ import annotations

import html
import re
from types import SimpleNamespace

import pytest
from django.urls import reverse
from django.utils import timezone

from audit.ledger import events as ledger_events
from consortium.core.errors import ConflictError
from tests.support.agreements import agreement_in_force
from tests.support.ledger_checks import ledger_records
from tests.support.training_fixtures import make_scene
from tests.support.training_pages import AGREEMENT_TITLE, job_data, steward_registers_datasets
from training.fl.audit_report import summary_of
from training.jobs.audit_gate import approval_refusal
from training.jobs.compliance import ComplianceError
from training.jobs.describe import describe_privacy_audit
from training.jobs.proposals import job_update_spec
from training.jobs.spec import spec_digest, validate_spec
from training.models import Approval, JobState, PrivacyAudit, TrainingJob
from training.web.forms import JobForm

pytestmark = pytest.mark.django_db

AUDIT = {"records": 8, "seed": 0}
CAPS = {"audit_max_median_ssim": "0.30", "audit_max_success_rate": "0.25"}


def image_summary(*, median_ssim=0.12, success_rate=0.0, conclusive=True) -> dict:
    """A measured image audit's summary, as the centre keeps it."""
    return summary_of(
        {
            "modality": "image",
            "summary": {
                "records": 8,
                "median_ssim": median_ssim,
                "mean_ssim": median_ssim,
                "median_psnr": 11.0,
                "mean_psnr": 11.0,
                "success_rate": success_rate,
                "label_inference_rate": 1.0,
            },
            "records": [{"attack": "dlg", "success": False, "ssim": median_ssim}],
            "shared_fraction": 0.4,
            "label_inference": "ran",
            "conclusive": conclusive,
            "calibration": None if conclusive is None else {"records": 2, "success_rate": 0.5},
        }
    )


def tabular_summary(*, success_rate=0.0) -> dict:
    """A measured tabular audit's summary: no SSIM, a relative error instead."""
    return summary_of(
        {
            "modality": "tabular",
            "summary": {
                "records": 8,
                "median_relative_error": 0.8,
                "mean_relative_error": 0.8,
                "median_features_within": 0.1,
                "mean_features_within": 0.1,
                "success_rate": success_rate,
                "label_inference_rate": None,
            },
            "records": [],
            "shared_fraction": 0.4,
            "label_inference": "ran",
            "conclusive": True,
            "calibration": {"records": 2, "success_rate": 1.0},
        }
    )


def report(job, institution, *, outcome="measured", summary=None, reason=""):
    """``institution``'s audit of the job's current spec, reported."""
    job.refresh_from_db()
    row, _ = PrivacyAudit.objects.update_or_create(
        job=job,
        institution=institution,
        spec_digest=job.spec_digest,
        defaults={
            "status": PrivacyAudit.Status.REPORTED,
            "outcome": outcome,
            "summary": summary if outcome == "measured" else None,
            "reason": reason,
            "reported_at": timezone.now(),
        },
    )
    return row


def refusal_of(scene, job, institution) -> ConflictError:
    # A refused decision writes nothing.
    with ledger_records(), pytest.raises(ConflictError) as caught:
        scene.decide(job, institution)
    job.refresh_from_db()
    assert job.state == JobState.AWAITING_APPROVAL
    assert not Approval.objects.filter(job=job, institution=institution).exists()
    return caught.value


# --- compliance at proposal ----------------------------------------------------------------------


def test_a_job_must_ask_for_the_audit_the_agreement_requires(cast):
    scene = make_scene(cast, privacy_audit_required=True)
    with pytest.raises(ComplianceError) as caught:
        scene.propose()
    (problem,) = caught.value.problems
    assert problem.term == "privacy_audit"
    assert problem.message == (
        "The agreement requires each site's privacy audit before approval: ask for it in the "
        "proposal (privacy_audit)."
    )
    assert not TrainingJob.objects.exists()
    job = scene.propose(privacy_audit=AUDIT)
    assert job.state == JobState.AWAITING_APPROVAL
    assert job.spec["privacy_audit"] == AUDIT


def test_an_agreement_without_the_term_does_not_ask_for_the_audit(cast):
    scene = make_scene(cast)
    assert scene.propose().state == JobState.AWAITING_APPROVAL


# --- the gate ------------------------------------------------------------------------------------


def test_the_required_audit_must_be_in_before_an_institution_approves(cast):
    scene = make_scene(cast, privacy_audit_required=True)
    job = scene.propose(privacy_audit=AUDIT)
    refused = refusal_of(scene, job, cast.hospital_a)
    assert refused.code == "audit_pending"
    text = str(refused)
    assert "Hospital A has not reported its privacy audit" in text
    assert "version 1 of the agreement requires it before Hospital A approves" in text
    assert "site worker runs the audit and must be online" in text
    # Hospital B's audit does not stand in for Hospital A's.
    report(job, cast.hospital_b, summary=tabular_summary())
    assert refusal_of(scene, job, cast.hospital_a).code == "audit_pending"
    with ledger_records(ledger_events.JOB_DECISION):
        scene.decide(job, cast.hospital_b)
    # Without a maximum, any reported audit will do, even one out of the audit's reach.
    report(job, cast.hospital_a, outcome="out_of_reach", reason="the model is too large")
    scene.decide(job, cast.hospital_a)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED


def test_rejecting_is_never_gated(cast):
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    scene.decide(job, cast.hospital_a, "rejected", reason="We will not wait for the audit.")
    job.refresh_from_db()
    assert job.state == JobState.REJECTED


def test_an_audit_of_an_earlier_spec_does_not_count(cast):
    scene = make_scene(cast, privacy_audit_required=True)
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=tabular_summary())
    job = job_update_spec(
        acting_user=cast.researcher,
        job=job,
        spec={**job.spec, "privacy_audit": {"records": 4, "seed": 1}},
    )
    assert refusal_of(scene, job, cast.hospital_a).code == "audit_pending"


def test_with_a_maximum_an_audit_out_of_reach_refuses_quoting_its_reason(cast):
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    report(
        job,
        cast.hospital_a,
        outcome="out_of_reach",
        reason="the model has 2,000,000 trainable parameters, more than the audit's limit",
    )
    refused = refusal_of(scene, job, cast.hospital_a)
    assert refused.code == "audit_out_of_reach"
    assert "caps the privacy audit's median SSIM and success rate" in str(refused)
    assert "could not attack this job's model: the model has 2,000,000 trainable" in str(refused)


def test_with_a_maximum_an_inconclusive_audit_refuses(cast):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_median_ssim="0.3")
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.05, conclusive=False))
    refused = refusal_of(scene, job, cast.hospital_a)
    assert refused.code == "audit_inconclusive"
    assert "Hospital A's audit is inconclusive" in str(refused)
    assert "rebuilt none of 2 records even from an unfiltered update" in str(refused)
    assert "a low figure proves nothing here" in str(refused)


def test_a_median_ssim_above_the_maximum_refuses_naming_figure_and_maximum(cast):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_median_ssim="0.30")
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.96))
    refused = refusal_of(scene, job, cast.hospital_a)
    assert refused.code == "audit_above_maximum"
    assert str(refused) == (
        "The agreement caps the privacy audit's median SSIM at 0.30; Hospital A's audit "
        "measured 0.96 under this pipeline (1 is an exact copy). Reject the job or ask the "
        "proposer for a stronger pipeline."
    )


def test_a_figure_just_above_the_maximum_does_not_read_as_equal_to_it(cast):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_median_ssim="0.3")
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.3041))
    assert "at 0.300; Hospital A's audit measured 0.304 under" in str(
        refusal_of(scene, job, cast.hospital_a)
    )


def test_a_success_rate_above_the_maximum_refuses_in_percent(cast):
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.96, success_rate=0.75))
    text = str(refusal_of(scene, job, cast.hospital_a))
    # Both figures above: both named, then what to do, once.
    assert "median SSIM at 0.30; Hospital A's audit measured 0.96" in text
    assert (
        "caps the privacy audit's success rate (the share of audited records its attacks "
        "rebuild) at 25%; Hospital A's audit measured 75% under this pipeline."
    ) in text
    assert text.count("Reject the job") == 1


def test_figures_within_the_maxima_allow_the_approval(cast):
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.30, success_rate=0.25))
    # Not calibrated (conclusive None) is not inconclusive: the figures are read.
    report(job, cast.hospital_b, summary=image_summary(median_ssim=0.1, conclusive=None))
    scene.decide(job, cast.hospital_a)
    scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED


def test_a_tabular_audit_is_held_to_the_success_rate_only(cast):
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    report(job, cast.hospital_a, summary=tabular_summary(success_rate=0.125))
    scene.decide(job, cast.hospital_a)  # no SSIM measured: the SSIM cap has nothing to cap
    report(job, cast.hospital_b, summary=tabular_summary(success_rate=0.5))
    text = str(refusal_of(scene, job, cast.hospital_b))
    assert "at 25%; Hospital B's audit measured 50%" in text
    assert "SSIM" not in text


def test_when_only_the_spec_asks_the_approver_decides_before_the_audit_is_in(cast):
    scene = make_scene(cast)
    job = scene.propose(privacy_audit=AUDIT)
    assert PrivacyAudit.objects.filter(job=job, status="reported").count() == 0
    scene.decide(job, cast.hospital_a)
    scene.decide(job, cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED


# --- the review page -----------------------------------------------------------------------------


def page_text(response) -> str:
    text = re.sub(r"<[^>]+>", " ", response.content.decode())
    return re.sub(r"\s+", " ", html.unescape(text))


def test_the_review_page_shows_the_refusal_and_takes_a_rejection(cast):
    scene = make_scene(cast, privacy_audit_required=True, audit_max_median_ssim="0.30")
    job = scene.propose(privacy_audit=AUDIT)
    review = reverse("training:job-review", args=[cast.consortium.slug, job.pk])
    client = cast.client_for("approver")
    data = {
        "institution": cast.hospital_a.pk,
        "decision": "approved",
        "reason": "",
        "spec_digest": job.spec_digest,
        "agreement_version_id": job.agreement_version_id,
    }
    response = client.post(review, data)
    assert response.status_code == 200
    assert "Hospital A has not reported its privacy audit" in page_text(response)
    report(job, cast.hospital_a, summary=image_summary(median_ssim=0.96))
    response = client.post(review, data)
    assert response.status_code == 200
    assert (
        "The agreement caps the privacy audit's median SSIM at 0.30; Hospital A's audit "
        "measured 0.96 under this pipeline"
    ) in page_text(response)
    assert not Approval.objects.filter(job=job).exists()
    reason = "The audit rebuilt our records."
    response = client.post(review, {**data, "decision": "rejected", "reason": reason})
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.state == JobState.REJECTED and reason in job.end_reason


# --- the proposal form ---------------------------------------------------------------------------


@pytest.fixture
def ready(cast):
    agreement_in_force(cast, title=AGREEMENT_TITLE, privacy_audit_required=True)
    steward_registers_datasets(cast)
    return cast


def test_the_form_asks_for_the_audit_and_an_edit_keeps_it(ready):
    cast = ready
    client = cast.client_for("admin")
    create = reverse("training:job-create", args=[cast.consortium.slug])
    page = page_text(client.get(create))
    assert "Ask each site for a privacy audit before approval" in page
    assert "The agreement in force requires the audit" in page
    # Unticked, the records and seed count for nothing: the agreement refuses the job.
    response = client.post(create, job_data(cast, privacy_audit_records="4"))
    assert response.status_code == 200
    assert "Term: privacy_audit" in page_text(response)
    assert not TrainingJob.objects.exists()
    response = client.post(
        create,
        job_data(cast, privacy_audit="on", privacy_audit_records="", privacy_audit_seed=""),
    )
    assert response.status_code == 302, page_text(response)[:3000]
    job = TrainingJob.objects.get()
    assert job.spec["privacy_audit"] == {"records": 8, "seed": 0}

    # The edit page opens with the audit as it is; saving it with a change elsewhere keeps it.
    edit = reverse("training:job-edit", args=[cast.consortium.slug, job.pk])
    form = client.get(edit).context["form"]
    assert [form[name].value() for name in ("privacy_audit", "privacy_audit_records")] == [
        True,
        8,
    ]
    posted = {
        **job_data(cast, rounds="6", action="save"),
        "privacy_audit": "on",
        "privacy_audit_records": str(form["privacy_audit_records"].value()),
        "privacy_audit_seed": str(form["privacy_audit_seed"].value()),
    }
    response = client.post(edit, posted)
    assert response.status_code == 302, page_text(response)[:3000]
    job.refresh_from_db()
    assert (job.spec["rounds"], job.spec["privacy_audit"]) == (6, {"records": 8, "seed": 0})
    response = client.post(
        edit, {**posted, "privacy_audit_records": "3", "privacy_audit_seed": "42"}
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.spec["privacy_audit"] == {"records": 3, "seed": 42}


@pytest.mark.parametrize("audit", [None, {"records": 8, "seed": 0}, {"records": 32, "seed": 7}])
def test_saving_a_job_unchanged_through_the_form_keeps_its_audit(audit):
    spec = {
        "purpose": "classification",
        "participants": ["hospital-a", "hospital-b"],
        "dataset_key": "breast-cancer",
        "model": {"name": "mlp"},
        "rounds": 3,
        "optimizer": {"name": "sgd", "lr": 0.01},
    }
    spec = validate_spec({**spec, **({"privacy_audit": audit} if audit else {})})
    initial = JobForm.initial_from(SimpleNamespace(spec=spec, title="Kept"))
    institutions = [SimpleNamespace(slug=s, name=s.title()) for s in spec["participants"]]
    data = {k: v for k, v in initial.items() if v is not None}
    form = JobForm(data=data, institutions=institutions)
    assert form.is_valid(), form.errors
    again = validate_spec(form.to_spec())
    assert again.get("privacy_audit") == audit
    assert spec_digest(again) == spec_digest(spec)


def test_the_form_refuses_records_out_of_bounds():
    institutions = [SimpleNamespace(slug="hospital-a", name="Hospital A")]
    form = JobForm(
        data={"privacy_audit": "on", "privacy_audit_records": "33"}, institutions=institutions
    )
    assert not form.is_valid()
    assert "privacy_audit_records" in form.errors


# --- in words ------------------------------------------------------------------------------------


def test_the_audit_asked_in_words():
    spec = {"privacy_audit": {"records": 6, "seed": 11}}
    assert describe_privacy_audit(spec).startswith(
        "Before you decide, each site's worker attacks its own update under this pipeline on 6 "
        "of its records (seed 11) and reports only the figures"
    )
    assert describe_privacy_audit({}).startswith("This job asks for no privacy audit")


def test_the_gate_reads_an_audit_the_caller_already_holds_without_a_query(
    cast, django_assert_num_queries
):
    """The pages pass each institution's audit they already read: the gate then answers from
    it (the same answer as when it reads the audit itself) without another query."""
    scene = make_scene(cast, privacy_audit_required=True, **CAPS)
    job = scene.propose(privacy_audit=AUDIT)
    row = report(job, cast.hospital_a, summary=image_summary(median_ssim=0.96))
    job = TrainingJob.objects.select_related("agreement_version").get(pk=job.pk)
    read_itself = approval_refusal(job, cast.hospital_a)
    with django_assert_num_queries(0):
        given = approval_refusal(job, cast.hospital_a, row)
    assert read_itself is not None and given is not None
    assert str(given) == str(read_itself) and given.code == "audit_above_maximum"
