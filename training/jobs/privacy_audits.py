"""The privacy audit at the sites, before approval: asking each site to attack its own update
under a proposed job's pipeline, and the selectors the approval gate and the pages read.

A job whose spec asks for it (``training.jobs.spec.privacy_audit_settings``) is audited before
its approvers decide: each active participant trains one local step as the job would on a few of
its own records, applies the job's pipeline, attacks its own update and reports only figures,
signed (``training.site.audit``; the report's format is ``training.fl.audit_report``). So:

1. when the job is proposed, or its spec changes while it awaits approval
   (``training.jobs.proposals``), :func:`audit_request` runs in the proposal's transaction: one
   ``PrivacyAudit`` row per active participant for the job's current spec digest, the ledger's
   ``privacy_audit.requested``, one ``training.site_audit`` task per site queue, and the
   approvers' picture (an ``AuditPicture`` row, drawn centrally from public data by the
   ``training.audit_picture`` task, ``training.rounds.audit_pictures``);
2. each site's signed report is taken by ``training.rounds.audit_intake`` (behind ``POST
   /api/site/.../jobs/<id>/audit/``) and written to the ledger verbatim
   (``privacy_audit.reported``);
3. :func:`audits_tick` (from the coordinator's periodic pass) sends again the task of a site
   that has not reported, with back-off.

This module is in ``training.jobs`` (not beside the site evaluation in ``training.rounds``)
because the services that call it, proposing and deciding, are: the layers import downward
only.

An audit is bound to the spec digest it ran against: a changed spec asks again, under the new
digest, and the old rows stay as history (a spec changed back to an earlier digest finds that
digest's audits, which still hold: same digest, same model and pipeline). Nothing here blocks
the job: the approval gate (``training.jobs.approvals``, when the agreement requires the audit)
reads :func:`audit_of`.
"""

from __future__ import annotations

import datetime as dt
import logging

from django.db import transaction
from django.db.models import F
from django.utils import timezone

from audit.ledger import events as ledger_events
from consortium.governance.models import Institution
from training import outbox, queues
from training.jobs.spec import privacy_audit_settings
from training.jobs.transitions import record_job_event
from training.models import AuditPicture, JobParticipant, JobState, PrivacyAudit, TrainingJob

log = logging.getLogger(__name__)

__all__ = [
    "RESEND_CAP",
    "RESEND_FIRST",
    "audit_of",
    "audit_request",
    "audits_for",
    "audits_tick",
    "resend_due",
]

#: A site that has not reported its audit this long after the task was sent is sent it again.
#: Short, because the audit is on the approvers' path (they wait for it, unlike an evaluation,
#: which training does not wait for) and a lost message costs them that long; cheap, because a
#: second delivery of a task the site already ran only asks ``GET .../audit/`` and is told
#: ``already_reported``. The interval then doubles with each send (:func:`resend_due`), up to
#: :data:`RESEND_CAP`, so a site that is down for a day does not find a thousand copies queued.
RESEND_FIRST = dt.timedelta(seconds=60)
RESEND_CAP = dt.timedelta(hours=1)


# --- Asking the sites ---------------------------------------------------------------------------


def _send_audit_task(job: TrainingJob, slug: str) -> None:
    kwargs = {"job_id": job.pk, "site": slug, "spec_digest": job.spec_digest}
    outbox.send_after_commit(queues.SITE_AUDIT, kwargs=kwargs, queue=queues.site_queue(slug))


def audit_request(job: TrainingJob, *, acting_user=None, now: dt.datetime | None = None) -> bool:
    """Ask every active participant of ``job`` for its privacy audit of the job's current spec
    digest (see the module docstring); runs in the caller's transaction, which holds the
    ledger's lock (a proposal's or a spec change's). Returns False when the spec asks for no
    audit or the job does not await approval.

    Safe to call twice for one digest: the rows are ``get_or_create``d; the ledger's entry
    names only the sites newly asked (none: no entry); a site whose audit for this digest is
    still asked is sent its task again (after a spec changed back, its task was for another
    digest), one already reported is left alone."""
    settings_ = privacy_audit_settings(job.spec)
    if settings_ is None or job.state != JobState.AWAITING_APPROVAL:
        return False
    now = now or timezone.now()
    participants = list(
        JobParticipant.objects.filter(job=job, status=JobParticipant.Status.ACTIVE)
        .select_related("institution")
        .order_by("institution__slug")
    )
    created: list[str] = []
    send: list[str] = []
    for participant in participants:
        row, made = PrivacyAudit.objects.get_or_create(
            job=job,
            institution=participant.institution,
            spec_digest=job.spec_digest,
            defaults={"asked_at": now, "sent_at": now},
        )
        slug = participant.institution.slug
        if made:
            created.append(slug)
            send.append(slug)
        elif row.status == PrivacyAudit.Status.ASKED:
            PrivacyAudit.objects.filter(pk=row.pk).update(sent_at=now)
            send.append(slug)
    if created:
        record_job_event(
            ledger_events.PRIVACY_AUDIT_REQUESTED,
            actor=acting_user,
            job=job,
            spec_digest=job.spec_digest,
            sites=created,
            records=settings_["records"],
            seed=settings_["seed"],
        )
    for slug in send:
        _send_audit_task(job, slug)
    _picture, drawn_anew = AuditPicture.objects.get_or_create(
        job=job, spec_digest=job.spec_digest, defaults={"created_at": now}
    )
    if drawn_anew:
        outbox.send_after_commit(
            queues.AUDIT_PICTURE, kwargs={"job_id": job.pk, "spec_digest": job.spec_digest}
        )
    if send:
        log.info("job #%s: privacy audit asked of %s", job.pk, ", ".join(send))
    return True


# --- Reads --------------------------------------------------------------------------------------


def audits_for(job: TrainingJob) -> list[PrivacyAudit]:
    """The audits of the job's current spec digest, one per active participant asked (with its
    institution), by site slug. A participant taken out of the job is left out; an older
    digest's audits are history and not listed."""
    active = JobParticipant.objects.filter(
        job=job, status=JobParticipant.Status.ACTIVE
    ).values_list("institution_id", flat=True)
    return list(
        PrivacyAudit.objects.filter(job=job, spec_digest=job.spec_digest, institution_id__in=active)
        .select_related("institution")
        .order_by("institution__slug")
    )


def audit_of(job: TrainingJob, institution: Institution) -> PrivacyAudit | None:
    """``institution``'s audit of the job's current spec digest, or None when none was asked."""
    return (
        PrivacyAudit.objects.filter(job=job, institution=institution, spec_digest=job.spec_digest)
        .select_related("institution")
        .first()
    )


# --- The periodic pass --------------------------------------------------------------------------


def resend_due(row: PrivacyAudit, now: dt.datetime) -> bool:
    """Whether the site's task is due to be sent again: :data:`RESEND_FIRST` after it was first
    sent, then after as long again as it has waited so far (60 s, 120 s, 240 s...), at most
    :data:`RESEND_CAP` apart. No counter is kept: the wait so far is ``sent_at - asked_at``."""
    waited = row.sent_at - row.asked_at
    interval = min(max(RESEND_FIRST, waited), RESEND_CAP)
    return now - row.sent_at >= interval


def audits_tick(*, now: dt.datetime | None = None) -> list[int]:
    """Send again the ``training.site_audit`` task of each audit still asked, of a job that
    awaits approval, for its current spec digest, whose site has not reported after
    :func:`resend_due`'s interval; returns the rows sent again. A compare-and-set on
    ``sent_at``, so two coordinators do not both send it."""
    now = now or timezone.now()
    resent: list[int] = []
    rows = (
        PrivacyAudit.objects.filter(
            status=PrivacyAudit.Status.ASKED,
            job__state=JobState.AWAITING_APPROVAL,
            spec_digest=F("job__spec_digest"),
            sent_at__lte=now - RESEND_FIRST,
            job__participants__institution_id=F("institution_id"),
            job__participants__status=JobParticipant.Status.ACTIVE,
        )
        .select_related("job", "institution")
        .order_by("pk")
    )
    for row in rows:
        if not resend_due(row, now):
            continue
        with transaction.atomic():
            if PrivacyAudit.objects.filter(
                pk=row.pk, sent_at=row.sent_at, status=PrivacyAudit.Status.ASKED
            ).update(sent_at=now):
                _send_audit_task(row.job, row.institution.slug)
                resent.append(row.pk)
    if resent:
        log.info("privacy audit tasks sent again: %s", resent)
    return resent
