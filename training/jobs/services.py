"""Writes for training jobs: proposing, changing, approving, cancelling and
expiring jobs, the participants' data-set offers, and the privacy budget each
job reserves.

A job's life is an explicit state machine (``TRANSITIONS``); every transition
and every decision is a ledger entry written in the same transaction. Services
take keyword-only arguments and an explicit ``acting_user``; who may call them
is decided by views and viewsets through ``training.jobs.permissions``, except where
the rule is part of the act (only an institution's approver decides for it).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.mail import send_mail
from django.db import transaction
from django.urls import reverse
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json
from audit.ledger.chain import append_entry, describe_actor, lock_chain
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Consortium, Institution, Membership, Notification, Role
from consortium.governance.permissions import has_institution_role
from training import queues
from training.jobs.accounting import epsilon_spent
from training.jobs.compliance import ComplianceError, ComplianceReport, check_job_compliance
from training.jobs.registry import model_registry
from training.jobs.selectors import active_participants, current_decisions
from training.jobs.spec import SpecError, canonical_spec_text, spec_digest, validate_spec
from training.models import (
    TERMINAL_STATES,
    Approval,
    JobParticipant,
    JobState,
    Modality,
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)

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


def _record(event: str, *, actor, job: TrainingJob, institution=None, **payload):
    return append_entry(
        event=event,
        actor=actor,
        subject=job,
        consortium_slug=job.consortium.slug,
        institution_slug=institution.slug if institution is not None else "",
        payload={"job_id": job.pk, **payload},
    )


def _job_url(job: TrainingJob) -> str:
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


def _approvers_of(institution_ids) -> list:
    return [
        m.user
        for m in Membership.objects.filter(
            institution_id__in=list(institution_ids), role=Role.APPROVER
        ).select_related("user")
    ]


# --- Site data sets ------------------------------------------------------------------


def _clean_dataset(
    *, key, description, modality, num_records, input_shape, n_classes, schema
) -> dict:
    errors: dict[str, str] = {}
    import re

    key = (key or "").strip()
    if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", key):
        errors["key"] = (
            "Use 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter "
            "or digit."
        )
    if not (description or "").strip():
        errors["description"] = "Describe the data set (what it holds, how it was collected)."
    if modality not in Modality.values:
        errors["modality"] = f"Choose one of {', '.join(Modality.values)}."
    if not isinstance(num_records, int) or isinstance(num_records, bool) or num_records < 1:
        errors["num_records"] = "The number of records must be a whole number of at least 1."
    shape_ok = (
        isinstance(input_shape, list)
        and input_shape
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in input_shape)
    )
    if not shape_ok:
        errors["input_shape"] = "Give the shape of one input as positive whole numbers, e.g. [30]."
    elif modality == Modality.TABULAR and len(input_shape) != 1:
        errors["input_shape"] = "Tabular records have a shape of one number: [features]."
    elif modality in (Modality.IMAGE, Modality.SEGMENTATION) and len(input_shape) != 3:
        errors["input_shape"] = "Images have a shape of three numbers: [channels, height, width]."
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        errors["n_classes"] = "There must be at least two classes."
    if schema is not None and not isinstance(schema, dict):
        errors["schema"] = "The schema must be a JSON object."
    if errors:
        raise ValidationError(errors)
    return {
        "key": key,
        "description": description.strip(),
        "modality": modality,
        "num_records": num_records,
        "input_shape": input_shape,
        "n_classes": n_classes,
        "schema": schema or {},
    }


def dataset_register(*, acting_user, institution: Institution, **fields) -> SiteDataset:
    """Register the description of a data set the site offers (never the data)."""
    data = _clean_dataset(**{**{"schema": None}, **fields})
    if SiteDataset.objects.filter(institution=institution, key=data["key"]).exists():
        raise ConflictError(
            f"{institution} already offers a data set with the key '{data['key']}'."
        )
    with transaction.atomic():
        dataset = SiteDataset.objects.create(
            institution=institution, created_by=acting_user, **data
        )
        append_entry(
            event=ledger_events.DATASET_REGISTERED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=institution.consortium.slug,
            institution_slug=institution.slug,
            payload={k: v for k, v in data.items() if k != "description"},
        )
    return dataset


def dataset_update(*, acting_user, dataset: SiteDataset, **fields) -> SiteDataset:
    """Change a data set's description. The key is fixed: jobs name it."""
    current = {
        "key": dataset.key,
        "description": dataset.description,
        "modality": dataset.modality,
        "num_records": dataset.num_records,
        "input_shape": dataset.input_shape,
        "n_classes": dataset.n_classes,
        "schema": dataset.schema,
    }
    fields.pop("key", None)
    data = _clean_dataset(**{**current, **{k: v for k, v in fields.items() if v is not None}})
    changed = [k for k in data if data[k] != current[k]]
    if not changed:
        return dataset
    with transaction.atomic():
        for name in changed:
            setattr(dataset, name, data[name])
        dataset.updated_at = timezone.now()
        dataset.save(update_fields=[*changed, "updated_at"])
        append_entry(
            event=ledger_events.DATASET_UPDATED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=dataset.institution.consortium.slug,
            institution_slug=dataset.institution.slug,
            payload={"key": dataset.key, "changed": {k: data[k] for k in changed}},
        )
    return dataset


def dataset_remove(*, acting_user, dataset: SiteDataset) -> None:
    """Withdraw an offer. Refused while an unfinished job relies on it."""
    busy = JobParticipant.objects.filter(
        institution=dataset.institution, status=JobParticipant.Status.ACTIVE
    ).exclude(job__state__in=TERMINAL_STATES)
    for participant in busy.select_related("job"):
        if participant.job.spec.get("dataset_key") == dataset.key:
            raise ConflictError(
                f"Job #{participant.job.pk} ({participant.job.title}) uses '{dataset.key}': "
                "cancel it or wait until it ends."
            )
    with transaction.atomic():
        append_entry(
            event=ledger_events.DATASET_REMOVED,
            actor=acting_user,
            subject=dataset,
            consortium_slug=dataset.institution.consortium.slug,
            institution_slug=dataset.institution.slug,
            payload={"key": dataset.key},
        )
        dataset.delete()


# --- Proposing and changing jobs --------------------------------------------------------


def _lock_job(pk: int) -> TrainingJob:
    """Lock a job for a change. The ledger's head is locked first: every service
    takes the chain, then rows, so concurrent governance writes (a withdrawal
    that removes the institution from jobs, a decision on one of those jobs)
    cannot deadlock."""
    lock_chain()
    return (
        TrainingJob.objects.select_for_update(of=("self",)).select_related("consortium").get(pk=pk)
    )


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


def _release_reservations(job: TrainingJob) -> None:
    job.reservations.filter(status=PrivacyReservation.Status.RESERVED).update(
        status=PrivacyReservation.Status.RELEASED, released_at=timezone.now()
    )


def _record_refusal(
    *, acting_user, consortium: Consortium, title: str, spec: dict, exc, job_id=None
):
    """A refused proposal or change leaves the job as it was (or no job), but
    the refusal itself is on the record."""
    append_entry(
        event=ledger_events.JOB_PROPOSAL_REFUSED,
        actor=acting_user,
        consortium_slug=consortium.slug,
        payload={
            "job_id": job_id,
            "title": title,
            "spec_digest": spec_digest(spec),
            "problems": [p.to_json() for p in exc.problems],
        },
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
        _record(
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
    _record(
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
    _transition(job, JobState.AWAITING_APPROVAL, acting_user=acting_user, reason="proposed")
    notify(
        users=_approvers_of(i.pk for i in report.institutions.values()),
        consortium=job.consortium,
        message=f"Job #{job.pk} “{job.title}” needs your institution's approval.",
        url=_job_url(job),
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
            job = _lock_job(job.pk)
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
        job = _lock_job(job.pk)
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
            _release_reservations(job)
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
        _record(
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
            notify(
                users=_approvers_of(p.institution_id for p in active_participants(job)),
                consortium=job.consortium,
                message=f"Job #{job.pk} “{job.title}” changed: please review it again.",
                url=_job_url(job),
            )
    return job


# --- State machine -----------------------------------------------------------------------


def _transition(job: TrainingJob, to_state: str, *, acting_user, reason: str = "") -> None:
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
        _release_reservations(job)
    _record(
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
        job = _lock_job(job.pk)
        if to_state in _OWN_SERVICE and to_state in TRANSITIONS[job.state]:
            raise InvalidTransition(
                f"Job #{job.pk} becomes {JobState(to_state).label.lower()} only through "
                f"{_OWN_SERVICE[to_state]}, which makes the checks that go with it."
            )
        _transition(job, to_state, acting_user=acting_user, reason=reason)
    return job


def job_cancel(*, acting_user, job: TrainingJob, reason: str) -> TrainingJob:
    reason = (reason or "").strip()
    if not reason:
        raise ValidationError({"reason": "Say why the job is cancelled; it is recorded."})
    with transaction.atomic():
        job = _lock_job(job.pk)
        _transition(job, JobState.CANCELLED, acting_user=acting_user, reason=reason)
        notify(
            users=[
                job.proposer,
                *_approvers_of(p.institution_id for p in active_participants(job)),
            ],
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” was cancelled: {reason}",
            url=_job_url(job),
        )
    return job


# --- Approvals -----------------------------------------------------------------------


def _rebind_agreement(job: TrainingJob, *, acting_user) -> None:
    """If a newer agreement version is in force, re-check the job under it and
    bind the job to it (earlier decisions then no longer count)."""
    from consortium.governance.selectors import agreement_in_force

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
        _transition(
            job,
            JobState.FAILED,
            acting_user=acting_user,
            reason="no longer complies with the agreement in force: "
            + " ".join(p.message for p in report.problems),
        )
        return
    old = job.agreement_version.number if job.agreement_version else None
    job.agreement_version = current
    job.save(update_fields=["agreement_version"])
    _record(
        ledger_events.JOB_AGREEMENT_REBOUND,
        actor=acting_user,
        job=job,
        old_version=old,
        new_version=current.number,
    )


def _expire_if_overdue(job: TrainingJob, *, acting_user=None, now=None) -> bool:
    now = now or timezone.now()
    if job.state == JobState.AWAITING_APPROVAL and job.approval_deadline <= now:
        _transition(
            job,
            JobState.EXPIRED,
            acting_user=acting_user,
            reason=f"approvals were not all in by {job.approval_deadline.isoformat()}",
        )
        notify(
            users=[job.proposer],
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” expired before every approval was in.",
            url=_job_url(job),
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
    stale and the approver is asked to review again. A rejection needs a reason
    and rejects the job; the last approval needed approves (queues) it.
    """
    if decision not in Approval.Decision.values:
        raise ValidationError({"decision": "Approve or reject."})
    reason = (reason or "").strip()
    if decision == Approval.Decision.REJECTED and len(reason) < 5:
        raise ValidationError({"reason": "Give the reason for rejecting; the proposer sees it."})
    if not has_institution_role(acting_user, institution, Role.APPROVER):
        raise ServiceError(f"Only an approver of {institution} can decide for it.")
    # Expiring an overdue job, rebinding it to a newer agreement version or failing
    # it under that version must commit even though the decision is then refused:
    # the refusal is raised only after the transaction is over.
    approval, refusal = None, None
    with transaction.atomic():
        job = _lock_job(job.pk)
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
    _record(
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
    everyone = [job.proposer, *_approvers_of(p.institution_id for p in participants)]
    if rejections:
        first = rejections[0]
        _transition(
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
            url=_job_url(job),
        )
    elif participants and all(
        decisions.get(p.institution_id) is not None
        and decisions[p.institution_id].decision == Approval.Decision.APPROVED
        for p in participants
    ):
        _transition(
            job, JobState.APPROVED, acting_user=acting_user, reason="every participant approved"
        )
        # The coordinator starts the job once the approval is committed (a lost message is
        # made up for by training.rounds.coordinator.rounds_tick).
        job_id = job.pk
        transaction.on_commit(
            lambda: current_app.send_task(
                queues.JOB_START.name, args=[job_id], queue=queues.JOB_START.queue
            )
        )
        notify(
            users=everyone,
            consortium=job.consortium,
            message=f"Job #{job.pk} “{job.title}” is approved by every participant and queued.",
            url=_job_url(job),
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
            job = _lock_job(pk)
            if _expire_if_overdue(job, now=now):
                expired += 1
    return expired


def jobs_remove_institution(*, institution: Institution, reason: str, acting_user) -> list[int]:
    """Take an institution out of every unfinished job (after a withdrawal of
    consent): from the next round on it takes no part. A job left with fewer
    than its minimum of participants fails. Returns the affected job ids."""
    affected = []
    rows = JobParticipant.objects.filter(
        institution=institution, status=JobParticipant.Status.ACTIVE
    ).exclude(job__state__in=TERMINAL_STATES)
    for participant in rows.select_related("job__consortium"):
        job = _lock_job(participant.job_id)
        participant.status = JobParticipant.Status.REMOVED
        participant.removed_at = timezone.now()
        participant.removed_reason = reason
        participant.save(update_fields=["status", "removed_at", "removed_reason"])
        job.reservations.filter(
            institution=institution, status=PrivacyReservation.Status.RESERVED
        ).update(status=PrivacyReservation.Status.RELEASED, released_at=timezone.now())
        _record(
            ledger_events.JOB_PARTICIPANT_REMOVED,
            actor=acting_user,
            job=job,
            institution=institution,
            reason=reason,
        )
        remaining = job.participants.filter(status=JobParticipant.Status.ACTIVE).count()
        minimum = job.spec["min_participants"]
        if remaining < minimum:
            _transition(
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


def notification_mark_read(*, user, notification_ids: list[int] | None = None) -> int:
    qs = Notification.objects.filter(user=user, read_at__isnull=True)
    if notification_ids is not None:
        qs = qs.filter(pk__in=notification_ids)
    return qs.update(read_at=timezone.now())


def job_spec_json(job: TrainingJob) -> str:
    """The spec, pretty-printed for people (the canonical text is for hashing)."""
    return json.dumps(job.spec, indent=2, sort_keys=True)
