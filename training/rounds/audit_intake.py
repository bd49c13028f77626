"""Taking a site's privacy audit report (``GET``/``POST /api/site/.../jobs/<id>/audit/``): the
intake of :mod:`training.jobs.privacy_audits`, as ``training.rounds.evaluation_intake`` is for
the evaluation at the sites.

A report is taken only if it can count: the job awaits approval, the site's audit for the job's
current spec digest is asked and the site has not reported something else, the report is
canonical and names this job, this site and this digest (``training.fl.audit_report``: figures
only, no field an audit does not produce), it ran with the seed asked on no more records than
asked, and its signature verifies with the key of the credential that posts it (the site's
registered key). The checks that need no lock run first; then, under the ledger's lock (the
project's lock order), the state is read again and the row and its ``privacy_audit.reported``
entry (the text verbatim, its signature and the public key it verified against) are written
together, so the approval gate, which reads the row under the same lock, sees both or neither.
"""

from __future__ import annotations

import hashlib
from typing import Any

from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.errors import ServiceError
from training.fl.audit_report import MEASURED, AuditReport, AuditReportError, parse_report
from training.fl.audit_report import summary_of as audit_summary_of
from training.fl.signing import BadSignature, verify_update
from training.jobs.spec import privacy_audit_settings
from training.models import JobState, PrivacyAudit, SiteCredential, TrainingJob
from training.rounds.credentials import site_actor_repr
from training.rounds.lookups import one_or_none

__all__ = ["AuditRefused", "audit_asked_of", "audit_receive"]


class AuditRefused(ServiceError):
    """A site's privacy audit report that was not taken, or a request for the audit with nothing
    to do; ``status`` is the HTTP status to answer and ``code`` says why (the site worker reads
    ``not_asked``, ``already_reported`` and ``not_awaiting_approval`` as "nothing to do")."""

    code = "audit_refused"

    def __init__(self, message: str, *, code: str, status: int):
        super().__init__(message, code=code)
        self.status = status


def _asked_row(credential: SiteCredential, job_id: int) -> PrivacyAudit:
    """The site's audit of the job's current spec digest; 409 ``not_asked`` when there is none
    (the spec asks for no audit, or changed and the site takes no part under the new one)."""
    job = one_or_none(TrainingJob.objects.select_related("consortium").filter(pk=job_id))
    row = (
        None
        if job is None
        else one_or_none(
            PrivacyAudit.objects.select_related("institution").filter(
                job_id=job_id,
                institution_id=credential.institution_id,
                spec_digest=job.spec_digest,
            )
        )
    )
    if row is None:
        raise AuditRefused(
            f"No privacy audit of job #{job_id}'s current spec is asked of "
            f"{credential.institution.slug}.",
            code="not_asked",
            status=409,
        )
    row.job = job
    return row


def _not_awaiting(job: TrainingJob) -> AuditRefused:
    return AuditRefused(
        f"Job #{job.pk} is {JobState(job.state).label.lower()}, no longer awaiting approval: "
        "its privacy audit is not needed now.",
        code="not_awaiting_approval",
        status=409,
    )


def audit_asked_of(credential: SiteCredential, job_id: int) -> dict[str, Any]:
    """What the site is asked to audit now: ``{"job", "site", "spec_digest", "records",
    "seed"}``; :class:`AuditRefused` (409) when nothing is asked of it now. The caller has
    checked that the site takes part in the job (else 404)."""
    row = _asked_row(credential, job_id)
    job = row.job
    if row.status == PrivacyAudit.Status.REPORTED:
        raise AuditRefused(
            f"{row.institution.slug} already reported its privacy audit of job #{job_id}.",
            code="already_reported",
            status=409,
        )
    if job.state != JobState.AWAITING_APPROVAL:
        raise _not_awaiting(job)
    settings_ = privacy_audit_settings(job.spec)
    if settings_ is None:  # a row for this digest means its spec asked; defensive all the same
        raise AuditRefused(
            f"Job #{job_id}'s spec asks for no privacy audit.", code="not_asked", status=409
        )
    return {
        "job": job.pk,
        "site": row.institution.slug,
        "spec_digest": job.spec_digest,
        "records": settings_["records"],
        "seed": settings_["seed"],
    }


def _already_reported(row: PrivacyAudit, report: str) -> bool:
    """True when the site already reported exactly this report (a harmless repeat); raises
    :class:`AuditRefused` (409) when it reported another; False when it has not yet."""
    if row.status != PrivacyAudit.Status.REPORTED:
        return False
    if row.report_text == report:
        return True
    raise AuditRefused(
        f"{row.institution.slug} already reported a different privacy audit of job #{row.job_id}.",
        code="already_reported",
        status=409,
    )


def _check_matches(parsed: AuditReport, job: TrainingJob, slug: str) -> None:
    """The report is this job's, this site's and this digest's, and ran as asked (400)."""
    differs = [
        f"{what} {theirs!r}, not {ours!r}"
        for what, theirs, ours in (
            ("job", parsed.job_id, job.pk),
            ("site", parsed.site, slug),
            ("spec digest", parsed.spec_digest, job.spec_digest),
        )
        if theirs != ours
    ]
    if differs:
        raise AuditRefused(
            "the report is for another audit than the one asked: " + "; ".join(differs),
            code="bad_report",
            status=400,
        )
    asked = privacy_audit_settings(job.spec) or {}
    result = parsed.result
    if result is None:
        return
    if "seed" in result and result["seed"] != asked.get("seed"):
        raise AuditRefused(
            f"the audit ran with seed {result['seed']!r}, not the seed asked ({asked.get('seed')})",
            code="bad_report",
            status=400,
        )
    if len(result["records"]) > int(asked.get("records", 0)):
        raise AuditRefused(
            f"the audit reports {len(result['records'])} records, more than the "
            f"{asked.get('records')} asked",
            code="bad_report",
            status=400,
        )


def audit_receive(
    credential: SiteCredential, job_id: int, report: str, signature: str
) -> tuple[PrivacyAudit, bool]:
    """Verify and record a site's signed privacy audit report; returns ``(row, duplicate)``.

    Raises :class:`AuditRefused`: 400 ``bad_report`` for a report that is malformed (or carries
    more than figures), is another job's, site's or spec digest's, or did not run as asked; 400
    ``bad_signature`` when it does not verify with the credential's key; 409 when nothing is
    asked of the site (``not_asked``), it reported something else already
    (``already_reported``), or the job no longer awaits approval (``not_awaiting_approval``)."""
    row = _asked_row(credential, job_id)
    job = row.job
    slug = credential.institution.slug
    if _already_reported(row, report):
        return row, True
    if job.state != JobState.AWAITING_APPROVAL:
        raise _not_awaiting(job)
    try:
        parsed = parse_report(report)
    except AuditReportError as exc:
        raise AuditRefused(f"bad report: {exc}", code="bad_report", status=400) from None
    _check_matches(parsed, job, slug)
    try:
        verify_update(credential.public_key, report.encode("utf-8"), signature)
    except BadSignature as exc:
        raise AuditRefused(
            f"the signature does not verify with the key of credential '{credential.label}' "
            f"({credential.token_prefix}…): {exc}",
            code="bad_signature",
            status=400,
        ) from None
    digest = hashlib.sha256(report.encode("utf-8")).hexdigest()
    summary = (
        audit_summary_of(parsed.result)
        if parsed.outcome == MEASURED and parsed.result is not None
        else None
    )
    with transaction.atomic():
        lock_chain()
        fresh = PrivacyAudit.objects.select_related("institution", "job__consortium").get(pk=row.pk)
        if _already_reported(fresh, report):
            return fresh, True
        if fresh.job.state != JobState.AWAITING_APPROVAL:
            raise _not_awaiting(fresh.job)
        if fresh.job.spec_digest != row.spec_digest:
            raise AuditRefused(
                f"Job #{job.pk}'s spec changed before this report arrived: its audit is asked "
                "again for the new spec.",
                code="not_asked",
                status=409,
            )
        now = timezone.now()
        PrivacyAudit.objects.filter(pk=row.pk).update(
            status=PrivacyAudit.Status.REPORTED,
            outcome=parsed.outcome,
            summary=summary,
            reason=parsed.reason,
            report_text=report,
            report_digest=digest,
            signature=signature,
            reported_at=now,
        )
        append_entry(
            event=ledger_events.PRIVACY_AUDIT_REPORTED,
            actor_repr=site_actor_repr(credential),
            subject=fresh.job,
            consortium_slug=fresh.job.consortium.slug,
            institution_slug=slug,
            payload={
                "job_id": job.pk,
                "spec_digest": row.spec_digest,
                "site": slug,
                "outcome": parsed.outcome,
                "summary": summary,
                "report": report,
                "report_digest": digest,
                "signature": signature,
                "public_key": credential.public_key,
            },
        )
    fresh.refresh_from_db()
    return fresh, False
