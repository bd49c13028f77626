"""The coordinator: running approved jobs round by round (docs/architecture.md, section 4, step 3).

Round state lives in our own rows (``Round``, ``SiteUpdate``, ``GlobalModel``), never in
Celery's result store, and every move is a compare-and-set update, so that

* a task delivered twice does no harm: the second ``round_maybe_close`` finds the round no
  longer open and does nothing; a second ``job_start`` finds the job no longer approved;
  a site task delivered twice uploads the same update twice, and the second upload is a
  harmless duplicate (``training.rounds.intake.update_receive``);
* a site worker killed mid-task does not lose the round: :func:`rounds_tick` sends again a
  site task that has not reported after ``FL_REDISPATCH_AFTER_SECONDS`` (the embedded
  filesystem broker drops the message of a killed worker, and Redis only restores it after its
  visibility timeout);
* after a coordinator restart the job resumes from its last completed round: a running job
  whose latest round is closed but has no next round gets it from :func:`rounds_tick`; a round
  left aggregating by a killed coordinator is claimed again by the next tick once its claim's
  lease runs out (``FL_CLAIM_LEASE_SECONDS``, renewed while the claimer works:
  ``training.rounds.leases``), and one whose aggregation hit a database error is handed back at
  once and claimed again at the next tick;
* a round's contribution scores never hold up the rounds after it: the close sends the round to
  the scoring worker's own queue (``training.round_score`` on ``scoring``,
  ``training.rounds.scoring_queue``) in the close's transaction, and the next round is already
  dispatched when scoring starts; a round a crash left unscored is sent again by the tick
  (``training.rounds.contributions.rescore_missing``);
* every message a move calls for (a site's task, closing a round, starting a job) is written to
  the outbox in the move's own transaction (``training.outbox``): a broker outage delays it,
  never drops it.

Lock order is the project's: the ledger chain (``audit.ledger.chain.lock_chain``) first, then rows.
The slow work (building, aggregating and evaluating models) runs outside any transaction.

Per round the coordinator checks every site's privacy budget before it sends anything
(``training.rounds.budgets``). A site that would go over is not sent the round (recorded in
the ledger); with fewer than ``min_participants`` left the job fails.

Topologies: ``fedavg`` sends the global model to every site at once; ``cyclic`` sends it to
one site at a time, each starting from the previous site's result (how a round's model is
made from the updates: ``training.rounds.aggregation``; how a model is built, stored and
read: ``training.rounds.states``). Every ``SiteUpdate`` records the model its site was sent
(``start_digest``, which the site API serves to that site) and when (``sent_at``); a cyclic
site's ``sent_at`` stays null until its turn comes, and sending it is a compare-and-set on
that null, so the next site is sent once.

This module imports no torch: models are built, aggregated and evaluated by those two modules,
which load it only when they run.

Lineage: ``GlobalModel.lineage_hash`` is ``sha256("genesis" || digest)`` for the initial model
and ``sha256(parent.lineage_hash || digest || canonical_json(sorted [[update_digest, weight]]))``
for a round's model, where ``weight`` is the update's sample count (:func:`lineage_hash`).

Why one module: it is the one place where a round or a job moves on the coordinator's side
(start, open, send, close, fail, complete, resume, send again: the periodic tick is a pass over
the same moves), each with the lock order and the compare-and-set it relies on. Split, a reader
would have to put the state machine back together across files, and a move would be easier to
add without its guard. Everything that changes no row lives beside it: the budget check
(``budgets``), the making and evaluating of a round's model (``aggregation``), model states
(``states``) and contribution scores (``contributions``).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import math
from dataclasses import dataclass, field

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.db.models import Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import canonical_json, sha256_hex
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.prepared import PreparedQuery
from training import liveness, outbox, queues
from training.jobs.privacy_audits import audits_tick
from training.jobs.selectors import round_with_job
from training.jobs.spec import aggregation_of
from training.jobs.transitions import job_transition
from training.models import (
    GlobalModel,
    JobParticipant,
    JobState,
    PrivacyReservation,
    Round,
    SiteUpdate,
    TrainingJob,
)
from training.rounds import absences, aggregation, scoring_queue, states
from training.rounds.artifacts import ArtifactError
from training.rounds.budgets import check_budgets
from training.rounds.contributions import scores_tick
from training.rounds.leases import RoundLease as _Lease
from training.rounds.leases import lease_length as _lease_length
from training.rounds.leases import new_token as _claim_token
from training.rounds.site_evaluation import evaluates_at_sites

log = logging.getLogger(__name__)

__all__ = [
    "TickReport",
    "genesis_lineage",
    "job_start",
    "lineage_hash",
    "round_maybe_close",
    "round_open",
    "rounds_tick",
]


# --- Lineage -------------------------------------------------------------------------------------


def genesis_lineage(digest: str) -> str:
    """The lineage hash of a job's initial model."""
    return sha256_hex("genesis" + digest)


def lineage_hash(parent_lineage: str, digest: str, contributions) -> str:
    """The lineage hash of a round's model: over its parent's lineage hash, its own digest and
    the sorted ``(update_digest, weight)`` pairs it was made from."""
    pairs = sorted([str(d), int(w)] for d, w in contributions)
    return sha256_hex(parent_lineage + digest + canonical_json(pairs))


# --- Small helpers -------------------------------------------------------------------------------


def _setting(name: str, default):
    return getattr(settings, name, default)


def _record(event: str, *, job: TrainingJob, subject=None, institution_slug: str = "", **payload):
    return append_entry(
        event=event,
        actor=None,
        subject=subject if subject is not None else job,
        consortium_slug=job.consortium.slug,
        institution_slug=institution_slug,
        payload={"job_id": job.pk, **payload},
    )


def _finite(value):
    """Metrics as canonical JSON takes them: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# The reads of every close and opening, compiled once per connection
# (consortium.core.prepared): compiling them cost the close more than running them.
_LOCKED_JOB = PreparedQuery(
    lambda job_id: (
        TrainingJob.objects.select_for_update(of=("self",))
        .select_related("consortium", "agreement_version")
        .filter(pk=job_id)
    ),
    one=True,
    job_id=int,
)
_ROUND_OF_JOB = PreparedQuery(
    lambda job_id, index: Round.objects.filter(job_id=job_id, index=index),
    one=True,
    job_id=int,
    index=int,
)
_ACTIVE_PARTICIPANTS = PreparedQuery(
    lambda job_id: (
        JobParticipant.objects.filter(job_id=job_id, status=JobParticipant.Status.ACTIVE)
        .select_related("institution")
        .order_by("institution__slug")
    ),
    job_id=int,
)


def _lock_job(job_id: int) -> TrainingJob:
    lock_chain()
    job = _LOCKED_JOB.one_or_none(job_id=int(job_id))
    if job is None:
        raise TrainingJob.DoesNotExist(f"no training job #{job_id}")
    return job


def _fail_job(job: TrainingJob, reason: str) -> None:
    """Fail a running (or approved) job, in the caller's transaction."""
    job.refresh_from_db(fields=["state"])
    if job.state in (JobState.RUNNING, JobState.APPROVED):
        job_transition(acting_user=None, job=job, to_state=JobState.FAILED, reason=reason)


def _send_site_task(*, job: TrainingJob, round_index: int, slug: str, start_digest: str) -> None:
    """Send one site its training task through the outbox (in the caller's transaction): ids
    and digests only (``start_digest``: the model the site starts from, its
    ``SiteUpdate.start_digest``)."""
    outbox.send_after_commit(
        queues.SITE_TRAIN,
        kwargs=_site_task_kwargs(job, round_index, slug, start_digest),
        queue=queues.site_queue(slug),
    )


def _site_task_kwargs(job: TrainingJob, round_index: int, slug: str, start_digest: str) -> dict:
    return {
        "job_id": job.pk,
        "round_index": round_index,
        "site": slug,
        "spec_digest": job.spec_digest,
        "start_digest": start_digest,
    }


# --- Starting a job ---------------------------------------------------------------------------


def job_start(job_id: int) -> Round | None:
    """Start an approved job: APPROVED -> RUNNING, the initial model (round 0) from the
    registry with a fixed seed, then round 1. Returns round 1, or None when the job is not
    approved (a second delivery of the task, a cancelled job) or failed at once (budgets)."""
    job = TrainingJob.objects.select_related("consortium").filter(pk=job_id).first()
    if job is None or job.state != JobState.APPROVED:
        return None
    spec = job.spec
    try:
        dataset = states.dataset_of(job, spec)
        seed = states.initial_seed(job)
        digest, size = states.store_state(states.initial_state(spec, dataset, seed))
    except (ValueError, ArtifactError, OSError) as exc:
        with transaction.atomic():
            job = _lock_job(job_id)
            if job.state == JobState.APPROVED:
                _fail_job(job, f"the initial model could not be built: {exc}")
        return None

    with transaction.atomic():
        job = _lock_job(job_id)
        if job.state != JobState.APPROVED:
            return None
        job_transition(
            acting_user=None,
            job=job,
            to_state=JobState.RUNNING,
            reason="every participant approved; the coordinator started the job",
        )
        model0 = GlobalModel.objects.create(
            job=job,
            round_index=0,
            digest=digest,
            lineage_hash=genesis_lineage(digest),
            size_bytes=size,
        )
        _record(
            ledger_events.MODEL_INITIALISED,
            job=job,
            subject=model0,
            round=0,
            digest=digest,
            lineage_hash=model0.lineage_hash,
            model=spec["model"]["name"],
            class_path=states.class_path(spec),
            seed=seed,
            size_bytes=size,
        )
        return round_open(job, 1, model0)


# --- Opening a round -------------------------------------------------------------------------


def round_open(job: TrainingJob, index: int, global_model: GlobalModel) -> Round | None:
    """Open round ``index`` of a running job from ``global_model`` and send it to the sites.

    Idempotent: an existing round ``index`` is returned as it is. Returns None when the job is
    not running, or when too few sites are within their privacy budget (the job then fails,
    with the reason). The site tasks are queued when the transaction commits.
    """
    with transaction.atomic():
        job = _lock_job(job.pk)
        if job.state != JobState.RUNNING:
            return None
        existing = _ROUND_OF_JOB.one_or_none(job_id=job.pk, index=int(index))
        if existing is not None:
            return existing
        spec = job.spec
        participants = _ACTIVE_PARTICIPANTS.all(job_id=job.pk)
        check = check_budgets(job, spec, participants)
        for skipped in check.skipped:
            _record(
                ledger_events.ROUND_SITE_SKIPPED,
                job=job,
                institution_slug=skipped["site"],
                round=index,
                **skipped,
            )
        minimum = spec["min_participants"]
        if len(check.eligible) < minimum:
            reasons = "; ".join(s["reason"] for s in check.skipped)
            _fail_job(
                job,
                f"round {index} was not sent: {len(check.eligible)} site(s) can take part, "
                f"fewer than the minimum of {minimum} ({reasons})",
            )
            return None
        now = timezone.now()
        rnd = Round.objects.create(
            job=job,
            index=index,
            global_model_in=global_model,
            opened_at=now,
            deadline=now + dt.timedelta(seconds=spec["round_timeout_seconds"]),
        )
        slugs = [p.institution.slug for p in check.eligible]
        cyclic = spec["topology"] == "cyclic"
        order = aggregation.cyclic_sites(slugs, index) if cyclic else slugs
        # fedavg: every site is sent the global model now; cyclic: one at a time, below.
        SiteUpdate.objects.bulk_create(
            SiteUpdate(
                round=rnd,
                institution=p.institution,
                dispatched_at=now,
                start_digest="" if cyclic else global_model.digest,
                sent_at=None if cyclic else now,
            )
            for p in check.eligible
        )
        _record(
            ledger_events.ROUND_OPENED,
            job=job,
            subject=rnd,
            round=index,
            topology=spec["topology"],
            global_digest=global_model.digest,
            lineage_hash=global_model.lineage_hash,
            sites=order,
            skipped=[s["site"] for s in check.skipped],
            deadline=rnd.deadline.isoformat(),
        )
        if cyclic:
            _cyclic_send(rnd, job, order[0], global_model.digest)
        else:  # every site at once: published together after the commit
            outbox.send_each_after_commit(
                queues.SITE_TRAIN,
                [
                    (
                        [],
                        _site_task_kwargs(job, index, slug, global_model.digest),
                        queues.site_queue(slug),
                    )
                    for slug in order
                ],
            )
    return rnd


def _cyclic_send(rnd: Round, job: TrainingJob, slug: str, digest: str) -> bool:
    """Send the cyclic round to ``slug`` once, starting from ``digest`` (compare-and-set on
    ``sent_at`` being null)."""
    claimed = SiteUpdate.objects.filter(
        round=rnd,
        institution__slug=slug,
        status=SiteUpdate.Status.DISPATCHED,
        sent_at__isnull=True,
    ).update(sent_at=timezone.now(), start_digest=digest)
    if not claimed:
        return False
    _record(
        ledger_events.ROUND_SITE_SENT,
        job=job,
        institution_slug=slug,
        round=rnd.index,
        site=slug,
        start_digest=digest,
    )
    _send_site_task(job=job, round_index=rnd.index, slug=slug, start_digest=digest)
    return True


# --- Closing a round -----------------------------------------------------------------------------


def _fail_round(
    rnd: Round, reason: str, *, from_state: str = Round.State.OPEN, token: str | None = None
) -> bool:
    """Fail the round (compare-and-set, on the claim ``token`` too when aggregating) and its
    job; stragglers recorded. One transaction."""
    with transaction.atomic():
        job = _lock_job(rnd.job_id)
        guard = Round.objects.filter(pk=rnd.pk, state=from_state)
        if token is not None:
            guard = guard.filter(claim_token=token)
        failed = guard.update(
            state=Round.State.FAILED,
            failure_reason=reason,
            closed_at=timezone.now(),
            lease_expires_at=None,
        )
        if not failed:
            return False
        stragglers = sorted(
            rnd.updates.filter(status=SiteUpdate.Status.DISPATCHED).values_list(
                "institution__slug", flat=True
            )
        )
        rnd.updates.filter(status=SiteUpdate.Status.DISPATCHED).update(
            status=SiteUpdate.Status.STRAGGLER
        )
        _record(
            ledger_events.ROUND_FAILED,
            job=job,
            subject=rnd,
            round=rnd.index,
            reason=reason,
            stragglers=stragglers,
        )
        if job.state == JobState.RUNNING:
            _fail_job(job, f"round {rnd.index} failed: {reason}")
    return True


def round_maybe_close(round_id: int, *, now: dt.datetime | None = None) -> str:
    """Close the round if it is done, else wait (or, cyclic, send it to the next site).

    Done: every site asked has reported (accepted or rejected), or the deadline has passed.
    With at least ``min_participants`` accepted updates the round is aggregated, evaluated and
    closed, and the next round opened (or the job completed); with fewer it fails, and the job
    with it. Sites that never reported are recorded as stragglers. Returns what happened:
    ``"not_open"``, ``"waiting"``, ``"closed"`` or ``"failed"``.
    """
    now = now or timezone.now()
    rnd = round_with_job(round_id)
    if rnd is None or rnd.state != Round.State.OPEN:
        return "not_open"
    job = rnd.job
    if job.state != JobState.RUNNING:
        _fail_round(rnd, f"the job is {job.get_state_display().lower()}")
        return "failed"
    spec = job.spec
    rows = list(rnd.updates.values_list("institution__slug", "status"))
    pending = sorted(slug for slug, status in rows if status == SiteUpdate.Status.DISPATCHED)
    accepted = sum(1 for _, status in rows if status == SiteUpdate.Status.ACCEPTED)
    minimum = spec["min_participants"]
    if pending and now < rnd.deadline:
        if spec["topology"] == "cyclic":
            _cyclic_advance(rnd, job)
        return "waiting"
    if accepted < minimum:
        if pending:
            reason = (
                f"the deadline {rnd.deadline.isoformat()} passed with {accepted} accepted "
                f"update(s), fewer than the minimum of {minimum} (no update from "
                f"{', '.join(pending)})"
            )
        else:
            rejected = len(rows) - accepted
            reason = (
                f"{accepted} update(s) accepted and {rejected} rejected, fewer than the "
                f"minimum of {minimum}"
            )
        return "failed" if _fail_round(rnd, reason) else "not_open"

    # Claim the round: OPEN -> AGGREGATING, with a lease. A second delivery stops here.
    token = _claim_token()
    with transaction.atomic():
        claimed = Round.objects.filter(pk=rnd.pk, state=Round.State.OPEN).update(
            state=Round.State.AGGREGATING,
            closed_at=now,
            claim_token=token,
            lease_expires_at=timezone.now() + _lease_length(),
        )
        if not claimed:
            return "not_open"
        rnd.updates.filter(status=SiteUpdate.Status.DISPATCHED).update(
            status=SiteUpdate.Status.STRAGGLER
        )
    return _aggregate_and_finish(rnd.pk, token)


# --- The aggregation claim's lease (training.rounds.leases) -----------------------------------


def _reclaim(round_id: int, now: dt.datetime) -> str | None:
    """Take over the claim of a round whose lease ran out (its claimer died): a
    compare-and-set on the old token and expiry, so of two coordinators only one takes it.
    Returns the new token, or None when the claim is not free."""
    old = (
        Round.objects.filter(pk=round_id, state=Round.State.AGGREGATING)
        .values("claim_token", "lease_expires_at")
        .first()
    )
    if old is None or (old["lease_expires_at"] is not None and old["lease_expires_at"] > now):
        return None
    token = _claim_token()
    taken = Round.objects.filter(
        pk=round_id,
        state=Round.State.AGGREGATING,
        claim_token=old["claim_token"],
        lease_expires_at=old["lease_expires_at"],
    ).update(claim_token=token, lease_expires_at=timezone.now() + _lease_length())
    if not taken:
        return None
    log.warning("round #%s: its aggregation claim's lease ran out; claiming it again", round_id)
    return token


def _cyclic_advance(rnd: Round, job: TrainingJob) -> None:
    """Send the cyclic round to its next site once every site before it has reported: it
    starts from the previous site's result."""
    previous = None
    for update in aggregation.cyclic_rows(rnd):
        if update.status != SiteUpdate.Status.DISPATCHED:
            previous = update
            continue
        if update.sent_at is not None:
            return  # in flight
        if previous is None:  # pragma: no cover - the first site is sent when the round opens
            digest = rnd.global_model_in.digest
        elif previous.status == SiteUpdate.Status.ACCEPTED:
            digest, _size = states.store_state(aggregation.site_result(previous))
        else:
            digest = previous.start_digest  # nothing to apply: hand its start model on
        with transaction.atomic():
            _cyclic_send(rnd, job, update.institution.slug, digest)
        return


def _aggregate_and_finish(round_id: int, token: str) -> str:
    """Aggregate a round claimed for aggregation (the claim ``token`` is ours), then close it
    and move the job on, renewing the claim's lease meanwhile.

    A database error on the way (a dropped connection, a failover) must not leave the round
    claimed until its lease runs out: the claim is handed back (AGGREGATING -> OPEN, a
    compare-and-set) so that the next ``rounds_tick`` claims and aggregates it again, and
    ``"retry"`` is returned. Nothing was committed for the round before the close's own
    transaction, so aggregating again is safe. When even handing back fails (the database is
    still away), the lease runs out and the tick claims the round again."""
    try:
        with _Lease(round_id, token):
            return _aggregate_and_finish_once(round_id, token)
    except DatabaseError:
        log.exception(
            "aggregating round #%s hit a database error; handing the claim back", round_id
        )
        try:
            if not connection.in_atomic_block:  # a broken connection is replaced, not reused
                close_old_connections()
            Round.objects.filter(
                pk=round_id, state=Round.State.AGGREGATING, claim_token=token
            ).update(state=Round.State.OPEN, claim_token="", lease_expires_at=None)
        except DatabaseError:
            log.exception("round #%s stays claimed until its lease runs out", round_id)
        return "retry"


def _aggregate_and_finish_once(round_id: int, token: str) -> str:
    rnd = round_with_job(round_id)
    if rnd is None or rnd.state != Round.State.AGGREGATING or rnd.claim_token != token:
        return "not_open"
    job = rnd.job
    spec = job.spec
    updates = aggregation.accepted_updates(rnd)
    parent = rnd.global_model_in
    try:
        dataset = states.dataset_of(job, spec)
        if spec["topology"] == "cyclic":
            state = aggregation.cyclic_result(rnd)
        else:
            state = aggregation.fedavg(
                states.load_state(parent.digest),
                updates,
                zero_filled=aggregation_of(spec) == "zero_filled_mean",
            )
        digest, size = states.store_state(state)
        if evaluates_at_sites(job):
            # Measured by the sites after the close (training.rounds.site_evaluation).
            metrics = {"validation": "pending: evaluated at the sites after the round"}
        else:
            metrics = _finite(aggregation.evaluate(job, dataset, state))
    except (ValueError, ArtifactError, OSError, RuntimeError) as exc:
        log.exception("aggregation of %s failed", rnd)
        _fail_round(
            rnd, f"aggregation failed: {exc}", from_state=Round.State.AGGREGATING, token=token
        )
        return "failed"

    contributions = [(u.update_digest, u.samples) for u in updates]
    lineage = lineage_hash(parent.lineage_hash, digest, contributions)
    with transaction.atomic():
        job = _lock_job(job.pk)
        # Ours to close only while the claim is: a claimer whose lease was taken over stops here.
        closed = Round.objects.filter(pk=rnd.pk, state=Round.State.AGGREGATING, claim_token=token)
        if not closed.exists():
            return "not_open"
        model = GlobalModel.objects.create(
            job=job,
            round_index=rnd.index,
            digest=digest,
            lineage_hash=lineage,
            parent=parent,
            size_bytes=size,
            metrics=metrics,
        )
        closed.update(state=Round.State.CLOSED, global_model_out=model)
        # Scoring (and, for a job evaluated at the sites, the request to evaluate) is the
        # scoring worker's, on its own queue: the message commits with the close, and the
        # round's lease passes to it, so nothing below, nor the next round, waits for it.
        scoring_queue.scoring_send(rnd.pk)
        rows = aggregation.round_rows(rnd)
        _record(
            ledger_events.ROUND_CLOSED,
            job=job,
            subject=rnd,
            round=rnd.index,
            topology=spec["topology"],
            global_digest=digest,
            parent_digest=parent.digest,
            parent_lineage_hash=parent.lineage_hash,
            lineage_hash=lineage,
            updates=[
                {"update_digest": d, "weight": w}
                for d, w in sorted([u.update_digest, u.samples] for u in updates)
            ],
            sites={u.institution.slug: u.update_digest for u in updates},
            rejected={
                u.institution.slug: u.reject_reason
                for u in rows
                if u.status == SiteUpdate.Status.REJECTED
            },
            stragglers=[
                u.institution.slug for u in rows if u.status == SiteUpdate.Status.STRAGGLER
            ],
            metrics=metrics,
        )
        if job.state != JobState.RUNNING:
            return "closed"
        if rnd.index >= spec["rounds"]:
            _complete(job, model)
        else:
            round_open(job, rnd.index + 1, model)
    return "closed"


def _complete(job: TrainingJob, model: GlobalModel) -> None:
    job_transition(
        acting_user=None,
        job=job,
        to_state=JobState.COMPLETED,
        reason=f"all {model.round_index} rounds closed; final model {model.digest}",
    )
    # The reservation now stands for privacy actually spent.
    job.reservations.filter(status=PrivacyReservation.Status.RESERVED).update(
        status=PrivacyReservation.Status.SPENT
    )


# --- The periodic tick -----------------------------------------------------------------------


@dataclass
class TickReport:
    started: list = field(default_factory=list)
    closed: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    resumed: list = field(default_factory=list)
    redispatched: list = field(default_factory=list)
    evaluations: dict = field(default_factory=dict)
    audits_resent: list = field(default_factory=list)
    absent: list = field(default_factory=list)
    errors: list = field(default_factory=list)


def _guard(report: TickReport, what: str):
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - one bad job must not stop the tick
                log.exception("rounds_tick: %s failed", what)
                report.errors.append(f"{what}: {exc}")
                return None

        return inner

    return wrap


def rounds_tick(*, now: dt.datetime | None = None) -> TickReport:
    """The coordinator's periodic pass (Celery beat, every few seconds). Each step is safe to
    run twice, or beside the tasks it backs up:

    1. start approved jobs whose ``training.job_start`` message was lost (after a grace period);
    2. close (or fail) open rounds that are done or past their deadline, and fail open rounds of
       jobs that no longer run (a lost ``round_maybe_close`` costs at most one tick);
    3. claim again (and aggregate) rounds whose claimer died: their lease ran out;
    4. resume running jobs whose latest round is closed but whose next round was never opened;
    5. send again site tasks that have not reported after ``FL_REDISPATCH_AFTER_SECONDS`` or
       half their round's timeout, whichever is shorter (:func:`redispatch_delay`);
    6. scores (``contributions.scores_tick``): send again lost evaluation tasks, close
       evaluations past their deadline, send to the scoring queue again the rounds a lost
       message or a dead scoring worker left unscored (never scoring here: the tick runs on
       ``central``), write the job totals a crash left unwritten;
    7. privacy audits of jobs awaiting approval (``privacy_audits.audits_tick``): send again
       the audit task of a site that has not reported, with back-off;
    8. sites absent from ``FL_ABSENT_ROUNDS_ALERT`` rounds in a row: their jobs' proposers told
       (``absences.notify_absent_sites``); then the tick's heartbeat.
    """
    now = now or timezone.now()
    report = TickReport()
    # Messages a broker outage held back (the relay thread's backstop).
    _guard(report, "relaying the outbox")(outbox.relay_pending)()
    grace = dt.timedelta(seconds=_setting("FL_START_GRACE_SECONDS", 30))
    for pk in TrainingJob.objects.filter(
        state=JobState.APPROVED, state_changed_at__lte=now - grace
    ).values_list("pk", flat=True):
        if _guard(report, f"starting job #{pk}")(job_start)(pk) is not None:
            report.started.append(pk)

    for pk in list(Round.objects.filter(state=Round.State.OPEN).values_list("pk", flat=True)):
        outcome = _guard(report, f"closing round #{pk}")(round_maybe_close)(pk, now=now)
        if outcome == "closed":
            report.closed.append(pk)
        elif outcome == "failed":
            report.failed.append(pk)

    for pk in list(
        Round.objects.filter(state=Round.State.AGGREGATING)
        .filter(Q(lease_expires_at__lte=now) | Q(lease_expires_at__isnull=True))
        .values_list("pk", flat=True)
    ):
        token = _guard(report, f"claiming round #{pk} again")(_reclaim)(pk, now)
        if (
            token
            and _guard(report, f"aggregating round #{pk}")(_aggregate_and_finish)(pk, token)
            == "closed"
        ):
            report.closed.append(pk)

    for job in TrainingJob.objects.filter(state=JobState.RUNNING).select_related("consortium"):
        if _guard(report, f"resuming job #{job.pk}")(_resume)(job):
            report.resumed.append(job.pk)

    after = dt.timedelta(seconds=_setting("FL_REDISPATCH_AFTER_SECONDS", 300))
    # A round's lost task is sent again before its deadline whatever the two settings are:
    # after FL_REDISPATCH_AFTER_SECONDS or half the round's timeout, whichever comes first.
    soonest = min(after, dt.timedelta(seconds=queues.MIN_ROUND_TIMEOUT_SECONDS / 2))
    candidates = (
        SiteUpdate.objects.filter(
            status=SiteUpdate.Status.DISPATCHED,
            round__state=Round.State.OPEN,
            round__job__state=JobState.RUNNING,
            sent_at__lte=now - soonest,  # a cyclic site not sent yet (null) is not lost
        )
        .select_related("round__job__consortium", "round__global_model_in", "institution")
        .order_by("pk")
    )
    for update in candidates:
        if update.sent_at > now - redispatch_delay(update.round, after):
            continue
        if _guard(report, f"sending again update #{update.pk}")(_redispatch)(update, now):
            report.redispatched.append(update.pk)

    evaluations = _guard(report, "evaluations at the sites")(scores_tick)(now=now) or {}
    report.evaluations = {k: v for k, v in evaluations.items() if v}
    report.audits_resent = _guard(report, "privacy audits")(audits_tick)(now=now) or []
    # Sites that missed FL_ABSENT_ROUNDS_ALERT rounds in a row: their jobs' proposers told, once
    # per streak (a site.absent ledger entry, checked under the ledger's lock).
    told = _guard(report, "absent sites")(absences.notify_absent_sites)(now=now) or []
    report.absent = [(a.job_id, a.slug) for a in told]
    _guard(report, "recording the tick's heartbeat")(liveness.record_heartbeat)(
        liveness.TICK,
        interval_seconds=queues.ROUNDS_TICK.every_seconds,
        detail={"errors": len(report.errors)},
    )
    return report


def redispatch_delay(rnd: Round, after: dt.timedelta) -> dt.timedelta:
    """How long a site task of ``rnd`` may go unreported before it is sent again: ``after``
    (``FL_REDISPATCH_AFTER_SECONDS``) or half the round's timeout, whichever is shorter, so a
    lost task is always sent again before the round's deadline."""
    return min(after, (rnd.deadline - rnd.opened_at) / 2)


def _resume(job: TrainingJob) -> bool:
    """Open the next round of a running job whose latest round closed without a successor."""
    spec = job.spec
    latest = job.rounds.order_by("-index").first()
    if latest is None:
        model0 = job.global_models.filter(round_index=0).first()
        if model0 is None:
            return False
        return round_open(job, 1, model0) is not None
    if latest.state == Round.State.FAILED:
        with transaction.atomic():
            job = _lock_job(job.pk)
            _fail_job(job, f"round {latest.index} failed: {latest.failure_reason}")
        return False
    if latest.state != Round.State.CLOSED:
        return False
    if latest.index >= spec["rounds"]:
        with transaction.atomic():
            job = _lock_job(job.pk)
            if job.state == JobState.RUNNING:
                _complete(job, latest.global_model_out)
        return True
    log.info("resuming %s from round %s", job, latest.index)
    return round_open(job, latest.index + 1, latest.global_model_out) is not None


def _redispatch(update: SiteUpdate, now: dt.datetime) -> bool:
    """Send again a site task that never reported, from the same start model (compare-and-set
    on ``sent_at``)."""
    rnd = update.round
    job = rnd.job
    if update.sent_at is None or not update.start_digest:
        return False  # not sent yet: its turn has not come
    with transaction.atomic():
        moved = SiteUpdate.objects.filter(
            pk=update.pk, status=SiteUpdate.Status.DISPATCHED, sent_at=update.sent_at
        ).update(sent_at=now)
        if not moved:
            return False
        log.warning("sending round %s of %s to %s again", rnd.index, job, update.institution.slug)
        _send_site_task(
            job=job,
            round_index=rnd.index,
            slug=update.institution.slug,
            start_digest=update.start_digest,
        )
    return True
