"""Writes for proposing and changing training jobs: save a draft, propose (or submit a
draft), change the spec before approval, cancel.

Proposing checks the job against the agreement in force and the privacy budgets
(``training.jobs.compliance``) and reserves each participant's budget; a proposal or change
that breaks the agreement is refused and the refusal is on the record. Every change of state
goes through ``training.jobs.transitions``; the approvers' decisions are in
``training.jobs.approvals``. A spec that asks for a privacy audit has the sites asked for it
when it is proposed, and again when it changes before approval
(``training.jobs.privacy_audits``).
"""

from __future__ import annotations

import datetime as dt

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json
from audit.ledger.chain import append_entry, describe_actor, lock_chain
from consortium.governance.models import Consortium, Institution
from training.jobs.accounting import epsilon_spent
from training.jobs.compliance import ComplianceError, ComplianceReport, check_job_compliance
from training.jobs.notifications import approvers_of, job_url, notify
from training.jobs.privacy_audits import audit_request
from training.jobs.registry import model_registry
from training.jobs.selectors import active_participants
from training.jobs.spec import SpecError, canonical_spec_text, spec_digest, validate_spec
from training.jobs.transitions import (
    InvalidTransition,
    apply_transition,
    lock_job,
    record_job_event,
    release_reservations,
)
from training.models import JobParticipant, JobState, PrivacyReservation, TrainingJob


def _validated(spec: dict) -> dict:
    if not isinstance(spec, dict):
        raise ValidationError({"spec": "The job spec must be a JSON object."})
    try:
        return validate_spec(spec, registry=model_registry())
    except SpecError as exc:
        raise ValidationError(
            {"spec": [f"{path}: {msg}" for path, msg in exc.errors.items()]}
        ) from exc


def _clean_title(title: str) -> str:
    title = (title or "").strip()
    if not title:
        raise ValidationError({"title": "A job needs a title."})
    return title[:200]


def _lock_institutions(consortium: Consortium, slugs) -> None:
    """Serialise budget checks per institution: two proposals touching the same
    hospital queue here, so both cannot fit a cap that only one fits. (On
    SQLite the IMMEDIATE transaction already serialises every writer.)"""
    list(
        Institution.objects.select_for_update()
        .filter(consortium=consortium, slug__in=list(slugs))
        .order_by("pk")
        .values_list("pk", flat=True)
    )


def _reserve(job: TrainingJob, report: ComplianceReport) -> dict[str, float]:
    """Create this job's reservations from the compliance report's projections."""
    delta = float(report.version.delta)
    epsilons = {}
    for slug, events in report.job_events.items():
        institution = report.institutions[slug]
        eps = epsilon_spent(events, delta=delta)
        PrivacyReservation.objects.create(
            job=job,
            institution=institution,
            events_text=canonical_json([e.to_json() for e in events]),
            epsilon=eps,
            delta=delta,
        )
        epsilons[slug] = round(eps, 6)
    return epsilons


def _record_refusal(
    *, acting_user, consortium: Consortium, title: str, spec: dict, exc, job_id=None
):
    """A refused proposal or change leaves the job as it was (or no job), but
    the refusal itself is on the record, naming the agreement version it was
    checked against (when one was in force), so that version's compliance
    report lists it without guessing."""
    payload = {
        "job_id": job_id,
        "title": title,
        "spec_digest": spec_digest(spec),
        "problems": [p.to_json() for p in exc.problems],
    }
    version = exc.report.version
    if version is not None:
        payload["agreement_version"] = version.number
        payload["agreement_digest"] = version.content_digest
    append_entry(
        event=ledger_events.JOB_PROPOSAL_REFUSED,
        actor=acting_user,
        consortium_slug=consortium.slug,
        payload=payload,
    )


def job_create_draft(*, acting_user, consortium: Consortium, title: str, spec: dict) -> TrainingJob:
    """Save a validated spec as a draft: no compliance check, nothing reserved."""
    title = _clean_title(title)
    spec = _validated(spec)
    with transaction.atomic():
        job = TrainingJob.objects.create(
            consortium=consortium,
            title=title,
            spec_text=canonical_spec_text(spec),
            spec_digest=spec_digest(spec),
            proposer=acting_user,
            proposer_repr=describe_actor(acting_user),
        )
        record_job_event(
            ledger_events.JOB_DRAFTED,
            actor=acting_user,
            job=job,
            title=title,
            spec_digest=job.spec_digest,
        )
    return job


def _submit(job: TrainingJob, *, acting_user, spec: dict) -> TrainingJob:
    """Check compliance, reserve budgets, open the approval round. Runs inside the
    caller's transaction; raises ComplianceError (rolling everything back)."""
    lock_chain()
    _lock_institutions(job.consortium, spec["participants"])
    report = check_job_compliance(consortium=job.consortium, spec=spec, exclude_job_id=job.pk)
    if not report.ok:
        raise ComplianceError(report)
    now = timezone.now()
    job.agreement_version = report.version
    job.proposed_at = now
    job.approval_deadline = now + dt.timedelta(hours=spec["approval_ttl_hours"])
    job.save(update_fields=["agreement_version", "proposed_at", "approval_deadline"])
    JobParticipant.objects.bulk_create(
        JobParticipant(job=job, institution=report.institutions[slug])
        for slug in spec["participants"]
    )
    epsilons = _reserve(job, report)
    record_job_event(
        ledger_events.JOB_PROPOSED,
        actor=acting_user,
        job=job,
        title=job.title,
        spec_digest=job.spec_digest,
        agreement_version=report.version.number,
        agreement_digest=report.version.content_digest,
        participants=spec["participants"],
        projected_epsilon=epsilons,
        approval_deadline=job.approval_deadline.isoformat(),
    )
    apply_transition(job, JobState.AWAITING_APPROVAL, acting_user=acting_user, reason="proposed")
    # The spec's privacy audit, if it asks for one: each site audits its own update before
    # its approvers decide (the tasks go out when this transaction commits).
    audit_request(job, acting_user=acting_user, now=now)
    notify(
        users=approvers_of(i.pk for i in report.institutions.values()),
        consortium=job.consortium,
        message=f"Job #{job.pk} “{job.title}” needs your institution's approval.",
        url=job_url(job),
    )
    return job


def job_propose(*, acting_user, consortium: Consortium, title: str, spec: dict) -> TrainingJob:
    """Propose a job: validate, check it against the agreement and the budgets,
    reserve the budgets, and ask every participant's approvers.

    A job that breaks the agreement raises ComplianceError naming the term and
    the institution; nothing is created and the refusal is recorded.
    """
    title = _clean_title(title)
    spec = _validated(spec)
    try:
        with transaction.atomic():
            job = TrainingJob.objects.create(
                consortium=consortium,
                title=title,
                spec_text=canonical_spec_text(spec),
                spec_digest=spec_digest(spec),
                proposer=acting_user,
                proposer_repr=describe_actor(acting_user),
            )
            return _submit(job, acting_user=acting_user, spec=spec)
    except ComplianceError as exc:
        _record_refusal(
            acting_user=acting_user, consortium=consortium, title=title, spec=spec, exc=exc
        )
        raise


def job_submit(*, acting_user, job: TrainingJob) -> TrainingJob:
    """Submit a draft for approval (the same checks as ``job_propose``)."""
    try:
        with transaction.atomic():
            job = lock_job(job.pk)
            if job.state != JobState.DRAFT:
                raise InvalidTransition(
                    f"Job #{job.pk} is {job.get_state_display().lower()}, not a draft."
                )
            return _submit(job, acting_user=acting_user, spec=job.spec)
    except ComplianceError as exc:
        _record_refusal(
            acting_user=acting_user,
            consortium=job.consortium,
            title=job.title,
            spec=job.spec,
            exc=exc,
        )
        raise


def job_update_spec(
    *, acting_user, job: TrainingJob, spec: dict | None = None, title: str | None = None
) -> TrainingJob:
    """Change a job before it is approved. Approvals already given no longer
    count (they are bound to the old digest) and the approvers are asked again;
    the budgets are checked and reserved anew. A change that breaks the
    agreement is refused (and the refusal recorded); the job stays as it was."""
    try:
        return _update_spec(acting_user=acting_user, job=job, spec=spec, title=title)
    except ComplianceError as exc:
        _record_refusal(
            acting_user=acting_user,
            consortium=job.consortium,
            title=title or job.title,
            spec=_validated(spec if spec is not None else job.spec),
            exc=exc,
            job_id=job.pk,
        )
        raise


def _update_spec(*, acting_user, job: TrainingJob, spec: dict | None, title: str | None):
    spec = _validated(spec if spec is not None else job.spec)
    new_digest = spec_digest(spec)
    with transaction.atomic():
        job = lock_job(job.pk)
        if job.state not in (JobState.DRAFT, JobState.AWAITING_APPROVAL):
            raise InvalidTransition(
                f"Job #{job.pk} is {job.get_state_display().lower()}: only a draft or a job "
                "awaiting approval can change."
            )
        old_digest = job.spec_digest
        title = _clean_title(title) if title is not None else job.title
        if new_digest == old_digest and title == job.title:
            return job
        voided = 0
        if job.state == JobState.AWAITING_APPROVAL and new_digest != old_digest:
            voided = job.approvals.filter(
                spec_digest=old_digest, agreement_version_id=job.agreement_version_id
            ).count()
            # Released reservations stay as history (only live ones are unique).
            release_reservations(job)
            old_slugs = set(job.participants.values_list("institution__slug", flat=True))
            _lock_institutions(job.consortium, set(spec["participants"]) | old_slugs)
            report = check_job_compliance(
                consortium=job.consortium, spec=spec, exclude_job_id=job.pk
            )
            if not report.ok:
                raise ComplianceError(report)
            # Drop only the active participants the new spec leaves out; a row
            # removed by a withdrawal stays, with when and why.
            job.participants.filter(status=JobParticipant.Status.ACTIVE).exclude(
                institution__slug__in=spec["participants"]
            ).delete()
            JobParticipant.objects.bulk_create(
                [
                    JobParticipant(job=job, institution=report.institutions[slug])
                    for slug in spec["participants"]
                    if slug not in old_slugs
                ]
            )
            epsilons = _reserve(job, report)
            job.agreement_version = report.version
        else:
            epsilons = {}
        job.title = title
        job.spec_text = canonical_spec_text(spec)
        job.spec_digest = new_digest
        job.save(update_fields=["title", "spec_text", "spec_digest", "agreement_version"])
        record_job_event(
            ledger_events.JOB_SPEC_CHANGED,
            actor=acting_user,
            job=job,
            title=title,
            old_spec_digest=old_digest,
            spec_digest=new_digest,
            approvals_voided=voided,
            projected_epsilon=epsilons,
        )
        if job.state == JobState.AWAITING_APPROVAL and new_digest != old_digest:
            # An audit is bound to the digest it ran against: the new spec is audited anew
            # (the old digest's audits stay, as history).
            audit_request(job, acting_user=acting_user)
            notify(
                users=approvers_of(p.institution_id for p in active_participants(job)),
                consortium=job.consortium,
                message=f"Job #{job.pk} “{job.title}” changed: please review it again.",
                url=job_url(job),
            )
    return job


def job_cancel(*, acting_user, job: TrainingJob, reason: str) -> TrainingJob:
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Say why the job is cancelled; it is recorded."})
    with transaction.atomic():
        job = lock_job(job.pk)
        apply_transition(job, JobState.CANCELLED, acting_user=acting_user, reason=reason)
        notify(
            users=[
                job.proposer,
                *approvers_of(p.institution_id for p in active_participants(job)),
            ],
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” was cancelled: {reason}",
            url=job_url(job),
        )
    return job
