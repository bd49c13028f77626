"""Reads for training jobs: what a user may see, what waits on an approver, and
whether an approval still counts."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Prefetch, QuerySet

from consortium.models import Notification, Role
from consortium.permissions import grants_of
from consortium.selectors import consortium_ids_of

from .models import (
    Approval,
    JobParticipant,
    JobState,
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)


def jobs_visible_to(user) -> QuerySet[TrainingJob]:
    """Every member of a consortium sees its jobs: consortia are transparent
    inside, closed outside."""
    return TrainingJob.objects.filter(consortium_id__in=consortium_ids_of(user)).select_related(
        "consortium", "agreement_version"
    )


def datasets_visible_to(user) -> QuerySet[SiteDataset]:
    return SiteDataset.objects.filter(
        institution__consortium_id__in=consortium_ids_of(user)
    ).select_related("institution")


def jobs_for_list(user) -> QuerySet[TrainingJob]:
    """Jobs with what a list row shows, in a fixed number of queries."""
    return jobs_visible_to(user).prefetch_related(
        Prefetch(
            "participants",
            queryset=JobParticipant.objects.select_related("institution").order_by(
                "institution__name"
            ),
        )
    )


def is_valid_approval(approval: Approval, job: TrainingJob) -> bool:
    """A decision counts only for the spec and agreement version it was made under."""
    return (
        approval.spec_digest == job.spec_digest
        and approval.agreement_version_id == job.agreement_version_id
    )


def current_decisions(job: TrainingJob) -> dict[int, Approval]:
    """The latest *valid* decision per institution (uses prefetched approvals)."""
    decisions: dict[int, Approval] = {}
    for approval in sorted(job.approvals.all(), key=lambda a: a.decided_at, reverse=True):
        if approval.institution_id not in decisions and is_valid_approval(approval, job):
            decisions[approval.institution_id] = approval
    return decisions


def active_participants(job: TrainingJob) -> list[JobParticipant]:
    return [p for p in job.participants.all() if p.status == JobParticipant.Status.ACTIVE]


@dataclass
class PendingReview:
    job: TrainingJob
    institutions: list  # the user's institutions whose decision is awaited


def approver_inbox(user) -> list[PendingReview]:
    """Jobs awaiting a decision from one of the user's institutions.

    Three queries whatever the number of jobs: the jobs, their participants,
    their approvals.
    """
    approver_of = {g.institution_id for g in grants_of(user) if g.role == Role.APPROVER}
    if not approver_of:
        return []
    jobs = (
        jobs_visible_to(user)
        .filter(
            state=JobState.AWAITING_APPROVAL,
            participants__institution_id__in=approver_of,
            participants__status=JobParticipant.Status.ACTIVE,
        )
        .distinct()
        .order_by("approval_deadline", "pk")
        .prefetch_related(
            Prefetch("participants", queryset=JobParticipant.objects.select_related("institution")),
            "approvals",
        )
    )
    inbox = []
    for job in jobs:
        decided = current_decisions(job)
        waiting = [
            p.institution
            for p in active_participants(job)
            if p.institution_id in approver_of and p.institution_id not in decided
        ]
        if waiting:
            inbox.append(PendingReview(job=job, institutions=waiting))
    return inbox


def live_reservations(institution_ids) -> QuerySet[PrivacyReservation]:
    """Reservations that count against budgets (reserved or spent, not released)."""
    return PrivacyReservation.objects.filter(institution_id__in=institution_ids).exclude(
        status=PrivacyReservation.Status.RELEASED
    )


def notifications_of(user) -> QuerySet[Notification]:
    """The user's own notifications, newest first."""
    return Notification.objects.filter(user=user).select_related("consortium")


def unread_notification_count(user) -> int:
    return Notification.objects.filter(user=user, read_at__isnull=True).count()


def committed_privacy_events(institution_ids, *, exclude_job_id: int | None = None) -> dict:
    """Every privacy event each institution has spent or committed, for replay by
    the accountant: {institution_id: [PrivacyEvent, ...]}.

    The live reservations of jobs count whole (they bound what those jobs will
    spend). Accepted updates count for jobs whose reservation is not counted: the
    excluded job itself (its rounds so far), and jobs whose reservation was
    released when they failed or were cancelled mid-run, since the rounds they
    ran were spent all the same.
    """
    import json
    from collections import defaultdict

    from .accounting import PrivacyEvent
    from .models import SiteUpdate

    ids = list(institution_ids)
    events: dict[int, list] = defaultdict(list)
    covered: dict[int, set[int]] = defaultdict(set)
    live = live_reservations(ids)
    if exclude_job_id is not None:
        live = live.exclude(job_id=exclude_job_id)
    for institution_id, job_id, text in live.values_list("institution_id", "job_id", "events_text"):
        events[institution_id].extend(PrivacyEvent.from_json(e) for e in json.loads(text))
        covered[institution_id].add(job_id)
    accepted = SiteUpdate.objects.filter(
        status=SiteUpdate.Status.ACCEPTED, institution_id__in=ids
    ).values_list("institution_id", "round__job_id", "privacy_events")
    for institution_id, job_id, update_events in accepted:
        if job_id not in covered[institution_id]:
            events[institution_id].extend(PrivacyEvent.from_json(e) for e in update_events or [])
    return events
