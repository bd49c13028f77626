"""A withdrawal of consent reaches only the jobs that run under the agreement it was made
under (issue 14, defect 1).

An institution may sign several agreements of one consortium (a tumour study and an imaging
study, say). Withdrawing from one of them must not take the institution out of the jobs that
run under another: that would fail a job its own agreement still allows, and the ledger would
record a removal nobody consented to. A withdrawal under the job's own agreement, under any of
its versions, still removes the institution and fails the job below its minimum, as before.
"""

from __future__ import annotations

import json

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import agreement_in_force, amend
from tests.support.training_fixtures import TrainingScene, make_scene
from training.jobs.transitions import job_transition
from training.models import JobParticipant, JobState, PrivacyReservation

A, B = "hospital-a", "hospital-b"
OTHER_REASON = "We leave the imaging study; the tumour study goes on."
OWN_REASON = "Our ethics board withdrew its approval of the tumour study."


@pytest.fixture
def scene(cast) -> TrainingScene:
    """Two agreements signed by both hospitals: an imaging agreement first, then the tumour
    agreement (the newest, so the one in force, under which jobs are proposed)."""
    imaging = agreement_in_force(cast, title="Imaging DUA")
    scene = make_scene(cast, title="Tumour DUA")
    scene.imaging = imaging
    assert scene.version.agreement != imaging.agreement
    return scene


@pytest.fixture(autouse=True)
def _ledger_stays_verifiable(db):
    yield
    result = verify_chain()
    assert result.ok, result.summary()


def running_job(scene, **spec):
    job = scene.propose(**spec)
    scene.decide(job, scene.cast.hospital_a)
    scene.decide(job, scene.cast.hospital_b)
    job.refresh_from_db()
    assert job.state == JobState.APPROVED
    return job_transition(acting_user=None, job=job, to_state=JobState.RUNNING)


def withdraw(scene, agreement, reason):
    return consent_withdraw(
        acting_user=scene.cast.approver_b,
        agreement=agreement,
        institution=scene.cast.hospital_b,
        reason=reason,
    )


def participant_statuses(job) -> dict[str, str]:
    return {p.institution.slug: p.status for p in job.participants.select_related("institution")}


def reservation_statuses(job) -> dict[str, str]:
    rows = job.reservations.select_related("institution")
    return {r.institution.slug: r.status for r in rows}


def removals(job) -> list[dict]:
    rows = LedgerEntry.objects.filter(event=ledger_events.JOB_PARTICIPANT_REMOVED).order_by("seq")
    return [
        payload
        for payload in (json.loads(row.payload_text) for row in rows)
        if payload.get("job_id") == job.pk
    ]


def test_a_withdrawal_under_another_agreement_leaves_the_running_job_untouched(scene):
    job = running_job(scene)
    waiting = scene.propose(title="Waiting for approval", noise_multiplier=8.0)
    before = {j.pk: reservation_statuses(j) for j in (job, waiting)}

    withdraw(scene, scene.imaging.agreement, OTHER_REASON)

    for j in (job, waiting):
        j.refresh_from_db()
        assert participant_statuses(j) == {A: "active", B: "active"}
        assert reservation_statuses(j) == before[j.pk]
        assert not removals(j)
        assert j.end_reason == ""
    assert job.state == JobState.RUNNING
    assert waiting.state == JobState.AWAITING_APPROVAL
    # Hospital B still decides for itself on the tumour job.
    scene.decide(waiting, scene.cast.hospital_b)


def test_a_withdrawal_under_the_jobs_own_agreement_still_removes_the_institution(scene):
    cast = scene.cast
    job = running_job(scene)  # both hospitals, minimum 2
    wide = scene.propose(title="One is enough", min_participants=1, noise_multiplier=8.0)
    # The agreement was amended since the job started: the job runs under version 1, and a
    # withdrawal made under version 2 is a withdrawal under the same agreement.
    amend(cast, scene.version, purpose="Train tumour classifiers and nothing else.")
    withdraw(scene, scene.imaging.agreement, OTHER_REASON)

    withdraw(scene, scene.version.agreement, OWN_REASON)

    job.refresh_from_db()
    assert job.agreement_version == scene.version  # still version 1
    assert job.state == JobState.FAILED
    assert "Hospital B withdrew; 1 participant(s) remain, fewer than the minimum of 2" in (
        job.end_reason
    )
    assert participant_statuses(job) == {A: "active", B: "removed"}
    removed = job.participants.get(institution=cast.hospital_b)
    # Removed by the withdrawal under the tumour agreement, not by the imaging one.
    assert removed.removed_reason == f"consent withdrawn: {OWN_REASON}"
    assert [p["reason"] for p in removals(job)] == [removed.removed_reason]
    assert set(reservation_statuses(job).values()) == {PrivacyReservation.Status.RELEASED}

    wide.refresh_from_db()
    assert wide.state == JobState.AWAITING_APPROVAL
    assert participant_statuses(wide) == {A: "active", B: "removed"}
    assert [p["reason"] for p in removals(wide)] == [f"consent withdrawn: {OWN_REASON}"]
    assert reservation_statuses(wide) == {A: "reserved", B: "released"}


def test_a_job_under_the_other_agreement_is_not_touched_by_a_withdrawal_under_this_one(scene):
    """The other way round: the tumour agreement's withdrawal leaves a job that runs under
    the imaging agreement (bound to it directly, as a job proposed while it was in force)."""
    job = running_job(scene)
    imaging_job = scene.propose(title="Imaging", noise_multiplier=8.0)
    imaging_job.agreement_version = scene.imaging
    imaging_job.save(update_fields=["agreement_version"])

    withdraw(scene, scene.version.agreement, OWN_REASON)

    job.refresh_from_db()
    imaging_job.refresh_from_db()
    assert job.state == JobState.FAILED
    assert imaging_job.state == JobState.AWAITING_APPROVAL
    assert participant_statuses(imaging_job) == {A: "active", B: "active"}
    assert not removals(imaging_job)
    assert JobParticipant.objects.filter(job=imaging_job, status="removed").count() == 0
