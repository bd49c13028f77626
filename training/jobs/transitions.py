"""A training job's state machine: which state may follow which, the one function that
moves a job (compare-and-set, in the caller's transaction, recorded in the ledger), the row
lock every job service takes, and ``job_transition``, the engine's entry point.

The moves that carry checks of their own (submitting, deciding, cancelling, expiring) have
their own services in ``training.jobs.proposals`` and ``training.jobs.approvals``; both build
on this module, which imports neither.
"""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.errors import ConflictError
from training.models import TERMINAL_STATES, JobState, PrivacyReservation, TrainingJob

# Which state may follow which. Anything else is refused with InvalidTransition.
TRANSITIONS: dict[str, frozenset[str]] = {
    JobState.DRAFT: frozenset({JobState.AWAITING_APPROVAL, JobState.CANCELLED}),
    JobState.AWAITING_APPROVAL: frozenset(
        {
            JobState.APPROVED,
            JobState.REJECTED,
            JobState.EXPIRED,
            JobState.CANCELLED,
            JobState.FAILED,
        }
    ),
    JobState.APPROVED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED}),
    **{state: frozenset() for state in TERMINAL_STATES},
}

# When a job ends without running, its reserved budget is given back.
_RELEASING_STATES = frozenset(
    {JobState.REJECTED, JobState.EXPIRED, JobState.CANCELLED, JobState.FAILED}
)


class InvalidTransition(ConflictError):
    code = "invalid_transition"


def record_job_event(event: str, *, actor, job: TrainingJob, institution=None, **payload):
    """A ledger entry about a job. The job's id leads the payload: the live job page picks
    its entries by it (``training.web.consumers``)."""
    return append_entry(
        event=event,
        actor=actor,
        subject=job,
        consortium_slug=job.consortium.slug,
        institution_slug=institution.slug if institution is not None else "",
        payload={"job_id": job.pk, **payload},
    )


def lock_job(pk: int) -> TrainingJob:
    """Lock a job for a change. The ledger's head is locked first: every service
    takes the chain, then rows, so concurrent governance writes (a withdrawal
    that removes the institution from jobs, a decision on one of those jobs)
    cannot deadlock."""
    lock_chain()
    return (
        TrainingJob.objects.select_for_update(of=("self",)).select_related("consortium").get(pk=pk)
    )


def release_reservations(job: TrainingJob) -> None:
    """Give back the budget a job still holds (the released rows stay, as history)."""
    job.reservations.filter(status=PrivacyReservation.Status.RESERVED).update(
        status=PrivacyReservation.Status.RELEASED, released_at=timezone.now()
    )


def apply_transition(job: TrainingJob, to_state: str, *, acting_user, reason: str = "") -> None:
    """Move a job along ``TRANSITIONS`` (in the caller's transaction) and record it."""
    from_state = job.state
    if to_state not in TRANSITIONS[from_state]:
        raise InvalidTransition(
            f"Job #{job.pk} is {JobState(from_state).label.lower()} and cannot become "
            f"{JobState(to_state).label.lower()}."
        )
    updated = TrainingJob.objects.filter(pk=job.pk, state=from_state).update(
        state=to_state,
        state_changed_at=timezone.now(),
        end_reason=reason if to_state in TERMINAL_STATES else "",
    )
    if updated != 1:  # someone else moved it first (compare-and-set)
        raise ConflictError(f"Job #{job.pk} changed state meanwhile; reload and try again.")
    job.refresh_from_db(fields=["state", "state_changed_at", "end_reason"])
    if to_state in _RELEASING_STATES:
        release_reservations(job)
    record_job_event(
        ledger_events.JOB_STATE_CHANGED,
        actor=acting_user,
        job=job,
        from_state=from_state,
        to_state=to_state,
        reason=reason,
    )


# The moves into these states have their own service, with the checks that go with
# them (compliance and reservations, approvals, a reason, the deadline): the
# engine's entry point cannot make them.
_OWN_SERVICE = {
    JobState.AWAITING_APPROVAL: "job_submit",
    JobState.APPROVED: "approval_decide",
    JobState.REJECTED: "approval_decide",
    JobState.CANCELLED: "job_cancel",
    JobState.EXPIRED: "jobs_expire_overdue",
}


def job_transition(
    *, acting_user, job: TrainingJob, to_state: str, reason: str = ""
) -> TrainingJob:
    """Public entry for the engine (running, completed, failed)."""
    if to_state not in JobState.values:
        raise InvalidTransition(f"Job #{job.pk} cannot move to the unknown state {to_state!r}.")
    with transaction.atomic():
        job = lock_job(job.pk)
        if to_state in _OWN_SERVICE and to_state in TRANSITIONS[job.state]:
            raise InvalidTransition(
                f"Job #{job.pk} becomes {JobState(to_state).label.lower()} only through "
                f"{_OWN_SERVICE[to_state]}, which makes the checks that go with it."
            )
        apply_transition(job, to_state, acting_user=acting_user, reason=reason)
    return job
