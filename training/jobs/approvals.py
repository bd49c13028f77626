"""Writes for the approvers' decisions and what settles a job: an institution's decision
(refused as stale when the job or the agreement changed since the approver looked, and an
approval refused while the institution's own privacy audit does not meet the agreement's audit
terms: ``training.jobs.audit_gate``), the job approved or rejected once the decisions are in,
rebinding a job to a newer agreement version, expiring jobs whose deadline passed, and taking a
withdrawn institution out of the jobs that run under the agreement it withdrew from.

Only an institution's approver decides for it: that rule is part of the act, so the service
checks it too.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import describe_actor
from consortium.core.errors import ActNotAllowedError, ConflictError, ServiceError
from consortium.governance.models import Agreement, Institution, Role
from consortium.governance.permissions import has_institution_role
from consortium.governance.selectors import agreement_in_force
from training import outbox, queues
from training.jobs.audit_gate import approval_refusal
from training.jobs.compliance import check_job_compliance
from training.jobs.notifications import approvers_of, job_url, notify
from training.jobs.selectors import active_participants, current_decisions
from training.jobs.transitions import (
    InvalidTransition,
    apply_transition,
    lock_job,
    record_job_event,
)
from training.models import (
    TERMINAL_STATES,
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    TrainingJob,
)


def _rebind_agreement(job: TrainingJob, *, acting_user) -> None:
    """If another agreement version is in force (a newer version of the job's
    agreement, or a version of a newer agreement), re-check the job under it and
    bind the job to it (earlier decisions then no longer count)."""
    status = agreement_in_force(job.consortium)
    current = status.version if status else None
    if current is not None and current.pk == job.agreement_version_id:
        return
    if current is None:
        # Typically an amendment awaits signatures. The job waits (its deadline
        # still runs) rather than failing for what may be a passing state.
        raise ConflictError(
            f"No data-use agreement is in force in {job.consortium} now: job #{job.pk} "
            "takes no decision until one is.",
            code="no_agreement",
        )
    report = check_job_compliance(consortium=job.consortium, spec=job.spec, exclude_job_id=job.pk)
    if not report.ok:
        apply_transition(
            job,
            JobState.FAILED,
            acting_user=acting_user,
            reason="no longer complies with the agreement in force: "
            + " ".join(p.message for p in report.problems),
        )
        return
    old = job.agreement_version
    # The version in force may belong to another agreement (the newest one in
    # force): the entry names both agreements, so a reader of the ledger follows
    # the job to the right one.
    agreements = {"new_agreement_id": current.agreement_id}
    if old is not None:
        agreements["old_agreement_id"] = old.agreement_id
    job.agreement_version = current
    job.save(update_fields=["agreement_version"])
    record_job_event(
        ledger_events.JOB_AGREEMENT_REBOUND,
        actor=acting_user,
        job=job,
        old_version=old.number if old is not None else None,
        new_version=current.number,
        **agreements,
    )


def _expire_if_overdue(job: TrainingJob, *, acting_user=None, now=None) -> bool:
    now = now or timezone.now()
    if job.state == JobState.AWAITING_APPROVAL and job.approval_deadline <= now:
        apply_transition(
            job,
            JobState.EXPIRED,
            acting_user=acting_user,
            reason=f"approvals were not all in by {job.approval_deadline.isoformat()}",
        )
        notify(
            users=[job.proposer],
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” expired before every approval was in.",
            url=job_url(job),
        )
        return True
    return False


def approval_decide(
    *,
    acting_user,
    job: TrainingJob,
    institution: Institution,
    decision: str,
    spec_digest: str,
    agreement_version_id: int | None,
    reason: str = "",
) -> Approval:
    """Record an approver's decision for their institution.

    ``spec_digest`` and ``agreement_version_id`` are what the approver was
    shown. If the job or the agreement changed since, the decision is refused as
    stale and the approver is asked to review again. An approval is refused (ConflictError,
    code ``audit_*``) while the agreement's privacy-audit terms are not met by the
    institution's own audit (:func:`training.jobs.audit_gate.approval_refusal`); a rejection
    never is. A rejection needs a reason and rejects the job; the last approval needed
    approves (queues) it.
    """
    if decision not in Approval.Decision.values:
        raise ValidationError({"decision": "Approve or reject."})
    reason = (reason or "").strip()
    if decision == Approval.Decision.REJECTED and len(reason) < 5:
        raise ValidationError({"reason": "Give the reason for rejecting; the proposer sees it."})
    if not has_institution_role(acting_user, institution, Role.APPROVER):
        raise ActNotAllowedError(
            f"Only an approver of {institution} can decide for it.", code="not_approver"
        )
    # Expiring an overdue job, rebinding it to a newer agreement version or failing
    # it under that version must commit even though the decision is then refused:
    # the refusal is raised only after the transaction is over.
    approval, refusal = None, None
    with transaction.atomic():
        job = lock_job(job.pk)
        if _expire_if_overdue(job, acting_user=None):
            refusal = ConflictError(
                f"Job #{job.pk} expired on {job.approval_deadline:%Y-%m-%d %H:%M} UTC before "
                "every approval was in.",
                code="expired",
            )
        else:
            approval, refusal = _decide(
                job,
                acting_user=acting_user,
                institution=institution,
                decision=decision,
                reason=reason,
                spec_digest=spec_digest,
                agreement_version_id=agreement_version_id,
            )
    if refusal is not None:
        raise refusal
    return approval


def _decide(
    job, *, acting_user, institution, decision, reason, spec_digest, agreement_version_id
) -> tuple[Approval | None, ConflictError | None]:
    """The decision itself, in approval_decide's transaction: ``(approval, None)``,
    or ``(None, refusal)`` where what happened so far must still commit."""
    if job.state != JobState.AWAITING_APPROVAL:
        raise InvalidTransition(
            f"Job #{job.pk} is {job.get_state_display().lower()}: it takes no decisions now."
        )
    participant = job.participants.filter(institution=institution).first()
    if participant is None or participant.status != JobParticipant.Status.ACTIVE:
        raise ServiceError(f"{institution} does not take part in job #{job.pk}.")
    _rebind_agreement(job, acting_user=acting_user)
    if job.state != JobState.AWAITING_APPROVAL:
        return None, ConflictError(f"Job #{job.pk} failed: {job.end_reason}", code="not_compliant")
    if spec_digest != job.spec_digest or agreement_version_id != job.agreement_version_id:
        return None, ConflictError(
            f"Job #{job.pk} or the agreement changed since you opened it: review the "
            "current version and decide again.",
            code="stale",
        )
    if decision == Approval.Decision.APPROVED:
        # The agreement's privacy-audit terms, on this institution's own audit of the current
        # spec (training.jobs.audit_gate). Refused like a stale decision: nothing is recorded,
        # the approver is told why and may reject instead.
        refusal = approval_refusal(job, institution)
        if refusal is not None:
            return None, refusal
    approval = Approval.objects.create(
        job=job,
        institution=institution,
        decision=decision,
        reason=reason,
        spec_digest=job.spec_digest,
        agreement_version_id=job.agreement_version_id,
        decided_by=acting_user,
        decided_by_repr=describe_actor(acting_user),
    )
    record_job_event(
        ledger_events.JOB_DECISION,
        actor=acting_user,
        job=job,
        institution=institution,
        decision=decision,
        reason=reason,
        spec_digest=job.spec_digest,
        agreement_version=job.agreement_version.number,
    )
    _settle(job, acting_user=acting_user)
    return approval, None


def _settle(job: TrainingJob, *, acting_user) -> None:
    """Approve the job when every active participant approved; reject it on any
    valid rejection."""
    job = (
        TrainingJob.objects.select_related("consortium")
        .prefetch_related("approvals", "participants__institution")
        .get(pk=job.pk)
    )
    decisions = current_decisions(job)
    participants = active_participants(job)
    rejections = [a for a in decisions.values() if a.decision == Approval.Decision.REJECTED]
    everyone = [job.proposer, *approvers_of(p.institution_id for p in participants)]
    if rejections:
        first = rejections[0]
        apply_transition(
            job,
            JobState.REJECTED,
            acting_user=acting_user,
            reason=f"{first.institution} rejected it: {first.reason}",
        )
        notify(
            users=everyone,
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” was rejected by {first.institution}: "
            f"{first.reason}",
            url=job_url(job),
        )
    elif participants and all(
        decisions.get(p.institution_id) is not None
        and decisions[p.institution_id].decision == Approval.Decision.APPROVED
        for p in participants
    ):
        apply_transition(
            job, JobState.APPROVED, acting_user=acting_user, reason="every participant approved"
        )
        # The coordinator starts the job once the approval is committed (a lost message is
        # made up for by training.rounds.coordinator.rounds_tick).
        outbox.send_after_commit(queues.JOB_START, args=[job.pk])
        notify(
            users=everyone,
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” is approved by every participant and queued.",
            url=job_url(job),
        )


def jobs_expire_overdue(*, now=None) -> int:
    """Expire every job whose approval deadline passed. Run periodically."""
    now = now or timezone.now()
    expired = 0
    overdue = TrainingJob.objects.filter(
        state=JobState.AWAITING_APPROVAL, approval_deadline__lte=now
    ).values_list("pk", flat=True)
    for pk in list(overdue):
        with transaction.atomic():
            job = lock_job(pk)
            if _expire_if_overdue(job, now=now):
                expired += 1
    return expired


def jobs_remove_institution(
    *, institution: Institution, agreement: Agreement, reason: str, acting_user
) -> list[int]:
    """Take an institution out of every unfinished job that runs under ``agreement`` (after
    its withdrawal of consent under that agreement): from the next round on it takes no part.
    A job left with fewer than its minimum of participants fails. Returns the affected job ids.

    Consent is given per agreement, so it is withdrawn per agreement: a job runs under the
    agreement version it is bound to (``TrainingJob.agreement_version``, set when it is
    proposed, moved only by a rebinding), and only a withdrawal under that agreement, whichever
    of its versions, reaches it. Jobs under another agreement the institution still consents to
    keep it (no removal, no release of its budget, no ledger entry)."""
    affected = []
    rows = (
        JobParticipant.objects.filter(
            institution=institution,
            status=JobParticipant.Status.ACTIVE,
            job__agreement_version__agreement=agreement,
        )
        .exclude(job__state__in=TERMINAL_STATES)
        .order_by("job_id")
    )
    for participant in rows.select_related("job__consortium"):
        job = lock_job(participant.job_id)
        if job.is_terminal or job.agreement_version.agreement_id != agreement.pk:
            # Settled or rebound between the read and the lock: no longer this withdrawal's.
            continue
        participant.status = JobParticipant.Status.REMOVED
        participant.removed_at = timezone.now()
        participant.removed_reason = reason
        participant.save(update_fields=["status", "removed_at", "removed_reason"])
        job.reservations.filter(
            institution=institution, status=PrivacyReservation.Status.RESERVED
        ).update(status=PrivacyReservation.Status.RELEASED, released_at=timezone.now())
        record_job_event(
            ledger_events.JOB_PARTICIPANT_REMOVED,
            actor=acting_user,
            job=job,
            institution=institution,
            reason=reason,
        )
        remaining = job.participants.filter(status=JobParticipant.Status.ACTIVE).count()
        minimum = job.spec["min_participants"]
        if remaining < minimum:
            apply_transition(
                job,
                JobState.FAILED,
                acting_user=acting_user,
                reason=f"{institution} withdrew; {remaining} participant(s) remain, fewer than "
                f"the minimum of {minimum}",
            )
        elif job.state == JobState.AWAITING_APPROVAL:
            _settle(job, acting_user=acting_user)
        affected.append(job.pk)
    return affected
