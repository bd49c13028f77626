"""Telling people about their jobs: an in-app notification for each user, and the same
message by email once the transaction commits; whom to tell (an institution's approvers) and
where to send them (the job's page).
"""

from __future__ import annotations

from collections.abc import Iterable

from django.conf import settings
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from consortium.governance.models import Consortium, Membership, Notification, Role
from training.models import TrainingJob


def job_url(job: TrainingJob) -> str:
    """The job's page, for the notification's link; empty where the pages are not routed."""
    try:
        return reverse("training:job-detail", args=[job.consortium.slug, job.pk])
    except Exception:  # noqa: BLE001 - the pages may not be routed (e.g. API-only deployments)
        return ""


def notify(*, users: Iterable, consortium: Consortium, message: str, url: str = "") -> None:
    """An in-app notification for each user, and the same message by email once
    the transaction commits."""
    users = {u.pk: u for u in users if u is not None}.values()
    Notification.objects.bulk_create(
        Notification(user=u, consortium=consortium, message=message[:500], url=url) for u in users
    )
    recipients = sorted({u.email for u in users if u.email})
    if recipients:
        link = f"\n\n{settings.SITE_URL}{url}" if url else ""
        transaction.on_commit(
            lambda: send_mail(
                subject=f"[{consortium.name}] {message[:120]}",
                message=message + link,
                from_email=settings.DEFAULT_FROM_EMAIL,
                recipient_list=recipients,
                fail_silently=True,
            )
        )


def approvers_of(institution_ids) -> list:
    """The approvers of these institutions: whom a job's proposal or change concerns."""
    return [
        m.user
        for m in Membership.objects.filter(
            institution_id__in=list(institution_ids), role=Role.APPROVER
        ).select_related("user")
    ]


def notification_mark_read(*, user, notification_ids: list[int] | None = None) -> int:
    """Mark the user's unread notifications read (those named, or all); returns how many."""
    qs = Notification.objects.filter(user=user, read_at__isnull=True)
    if notification_ids is not None:
        qs = qs.filter(pk__in=notification_ids)
    return qs.update(read_at=timezone.now())
