"""Contribution scores: each site's part in each round, computed centrally and recorded so that
anyone can recompute it (docs/architecture.md, section 4, step 3; issue 5).

Per closed round, :func:`round_score` values coalitions of the sites whose updates were accepted
(the ``delta/`` and ``mask/`` tensors they actually shared, after their privacy filters) by the
validation metric of the model the coalition's updates make from the round's input model
(:class:`training.fl.coalition.CoalitionUtility`: FedAvg for ``fedavg``, the sum of the masked
deltas for ``cyclic``), and scores the sites with the job's method
(:mod:`training.fl.contribution`; the spec's ``contribution``, see
``training.jobs.spec.contribution_settings``). Where the metric is measured is the spec's
``evaluation``: on the consortium's validation set (``central``), or by the sites on their own
validation shares (``sites``: :mod:`training.rounds.site_evaluation` asks them after the round
closes, with the coalitions planned up front; the round is scored when their evaluation closes,
from their signed reports, each coalition's value being its model's metric weighted by the
reporting sites' records).

When, where, and in which transaction. Scoring evaluates up to 2^8 models per round (more than
the round itself costs), so it runs neither in the round-close transaction nor on the
coordinator's queue: the close sends the round to the ``scoring`` queue
(``training.round_score``, :mod:`training.rounds.scoring_queue`), whose own worker scores it
(:func:`round_score_claimed`) outside any transaction and records in a transaction of its own.
The next round is dispatched and can close while models are evaluated, and the ledger's lock is
not held meanwhile. Recording is idempotent (the ledger is checked under its lock), so a second
call for the same round does nothing, and a failure to score never fails a closed round: it is
logged and recorded as ``contribution.unavailable`` with the reason. A round whose message was
lost, or whose scoring worker died mid-round, is sent to the scoring queue again by the
coordinator's periodic pass (:func:`scores_tick`) once the round's lease runs out;
``manage.py score_contributions --job ID`` (:func:`job_score_missing`) scores older rounds in
its own process, and jobs run before scoring existed.

The ledger contract (the auditors' reports read exactly this):

* ``contribution.scored``, subject the ``Round``: ``{"job_id", "round", "method", "params",
  "metric", "sites", "coalitions", "scores", "evaluations"}``; ``coalitions`` is every
  coalition evaluated (``[]`` and the full set included) as ``{"sites": [...], "value": v}``,
  and :func:`training.fl.contribution.scores_from_coalitions` recomputes ``scores`` from
  ``method``, ``params`` and ``coalitions`` bit for bit. ``metric`` names the figure the
  coalitions were valued by: ``accuracy`` or ``dice``, or ``neg_loss`` (minus the validation
  loss) when the spec's ``contribution.value`` is ``loss``. ``params`` always holds the ``seed``
  (derived from the spec digest and the round, :func:`round_seed`).
* ``contribution.job_scored``, subject the ``TrainingJob``, once the job has completed and its
  last round is scored: ``{"job_id", "method", "metric", "scores", "rounds"}`` with each site's
  scores summed over the rounds scored and the number of those rounds (``method`` is
  ``"mixed"`` when rounds used different methods, e.g. ``auto`` as sites came and went).

Each ``contribution.scored`` entry is written together with one ``ContributionScore`` row per
site (the pages' queries), which points back at the entry's ``seq``.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import defaultdict

from celery.exceptions import SoftTimeLimitExceeded
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.canonical import sha256_hex
from audit.ledger.chain import append_entry, lock_chain
from audit.ledger.selectors import subjects_recorded
from training.jobs.selectors import round_with_job
from training.jobs.spec import aggregation_of, contribution_settings, contribution_value, loss_of
from training.models import (
    ContributionScore,
    JobState,
    Round,
    RoundEvaluation,
    SiteUpdate,
    TrainingJob,
)
from training.rounds import scoring_queue, site_evaluation
from training.rounds.aggregation import accepted_updates
from training.rounds.leases import RoundLease
from training.rounds.states import build_model, dataset_of, load_state, load_update
from training.rounds.validation_sets import validation_set_of

log = logging.getLogger(__name__)

__all__ = [
    "MIXED",
    "evaluation_close_and_score",
    "job_score_missing",
    "round_contributions",
    "round_score",
    "round_score_claimed",
    "rescore_missing",
    "round_seed",
    "scores_tick",
]

MIXED = "mixed"

_ROUND_LABEL = Round._meta.label_lower
_JOB_LABEL = TrainingJob._meta.label_lower


class ScoringUnavailable(Exception):
    """The round cannot be scored (no validation set, no accepted update...): the reason."""


def round_seed(job: TrainingJob, round_index: int) -> int:
    """The sampled method's seed for one round: fixed by the spec digest (which the ledger
    holds) and the round, so a rerun of the same job samples the same permutations."""
    return int(sha256_hex(f"{job.spec_digest}:contribution:{round_index}")[:12], 16)


def round_contributions(rnd: Round):
    """Compute (without recording) the contributions of a closed round's accepted updates.

    Returns ``(Contributions, metric, updates)``; raises :class:`ScoringUnavailable` with the
    reason when the round cannot be scored. Each update artifact is read once; the coalitions
    reuse one aggregation buffer and one model (``CoalitionUtility``).
    """
    # Lazy torch: the engine's modules load it, and only a process that scores pays for it.
    from training.fl.coalition import CoalitionUtility
    from training.fl.contribution import SHAPLEY_SAMPLED, compute, resolve_method

    # Through the coordinator's own definitions (training.rounds.states and .aggregation): one
    # way an update artifact reads and the job's model is built, whatever the engine changes.
    job = rnd.job
    spec = job.spec
    updates = accepted_updates(rnd)
    if not updates:
        raise ScoringUnavailable("no accepted update to score")
    if site_evaluation.evaluates_at_sites(job):
        return _from_site_reports(rnd, updates)
    try:
        x, y, held = validation_set_of(job)
    except ValueError as exc:
        raise ScoringUnavailable(f"no consortium validation set: {exc}") from exc
    dataset = dataset_of(job, spec)
    shared = {}
    for update in updates:
        delta, mask = load_update(update.update_digest)
        shared[update.institution.slug] = (delta, mask or None, update.samples)
    settings = contribution_settings(spec)
    utility = CoalitionUtility(
        base_state=load_state(rnd.global_model_in.digest),
        updates=shared,
        model=build_model(spec, dataset),
        x=x,
        y=y,
        modality=dataset.modality,
        combine="sum" if spec["topology"] == "cyclic" else "mean",
        value=contribution_value(spec),
        loss=loss_of(spec),
        zero_filled=aggregation_of(spec) == "zero_filled_mean",
    )
    sampled = resolve_method(settings["method"], len(shared)) == SHAPLEY_SAMPLED
    result = compute(
        settings["method"],
        list(shared),
        utility,
        permutations=settings.get("permutations", 1),
        truncation=settings.get("truncation", 0.0),
        tolerance=settings.get("tolerance", 0.0),
        seed=round_seed(job, rnd.index),
        resolution=utility.resolution,
        **(_with_surrogate(rnd, utility) if sampled else {}),
    )
    return result, utility.metric, updates, ({"validation_set": held.digest} if held else {})


def _with_surrogate(rnd: Round, utility) -> dict:
    """Estimator 3's arguments when the round's surrogate can be made (``training.fl.
    coalition_surrogate``), else none, and the sampled method's default estimator runs. A
    surrogate that fails (a registered model forward-mode differentiation cannot go through,
    an overflow) costs the round its control variate, never its scores."""
    from training.fl.contribution import ESTIMATOR_CONTROL_VARIATE

    try:
        surrogate = utility.surrogate()
    except Exception:  # noqa: BLE001 - the estimator without it is still right, only noisier
        log.warning("%s: no surrogate for contribution scoring", rnd, exc_info=True)
        return {}
    if surrogate is None or not all(math.isfinite(x) for x in surrogate):
        return {}
    return {"estimator": ESTIMATOR_CONTROL_VARIATE, "surrogate": surrogate}


def _from_site_reports(rnd: Round, updates: list[SiteUpdate]):
    """Scores from the sites' evaluation reports of the round's coalition models: each
    coalition's value is its model's metric weighted by the reporting sites' records
    (:mod:`training.rounds.site_evaluation`). The method and parameters are those the
    coalitions were planned for, so the method needs no coalition the sites were not asked."""
    from training.fl.coalition import metric_for
    from training.fl.contribution import (
        ESTIMATOR_CONTROL_VARIATE,
        ESTIMATOR_PAIRED,
        SHAPLEY_SAMPLED,
        compute,
        sampled_kwargs,
    )

    reports = site_evaluation.reported_evaluations(rnd)
    if reports is None:
        raise ScoringUnavailable("the sites were never asked to evaluate this round's models")
    if not reports.reports:
        raise ScoringUnavailable(
            "no site reported its evaluation of the round's models in time (asked: "
            f"{', '.join(reports.missing)})"
        )
    evaluation = reports.evaluation
    metric = metric_for(
        dataset_of(rnd.job, rnd.job.spec).modality, contribution_value(rnd.job.spec)
    )
    by_digest = reports.values(metric)
    table = {
        frozenset(m["sites"]): by_digest[m["digest"]]
        for m in evaluation.asked_models
        if m["role"] == site_evaluation.ROLE_COALITION
    }
    plan = evaluation.plan
    players = plan["players"]
    if sorted(players) != sorted(u.institution.slug for u in updates):
        raise ScoringUnavailable("the round's accepted updates changed after its evaluation")

    def lookup(coalition):
        return table[frozenset(coalition)]

    params = dict(plan["params"])
    kwargs = sampled_kwargs(params) if plan["method"] == SHAPLEY_SAMPLED else {}
    if kwargs.get("estimator") == ESTIMATOR_PAIRED and metric == "accuracy":
        # The value is the records-weighted accuracy: it moves in steps of one record of all
        # those the sites reported on (the plan could not know how many).
        records = sum(reports.site_records.values())
        kwargs["resolution"] = 1.0 / records if records else 0.0
    surrogate = reports.surrogate() if plan.get("surrogate") else None
    if kwargs.get("estimator") == ESTIMATOR_PAIRED and surrogate is not None:
        # Every reporting site made the surrogate on its share: estimator 3 on the same plan.
        kwargs.update(estimator=ESTIMATOR_CONTROL_VARIATE, surrogate=surrogate)
    result = compute(plan["method"], players, lookup, **(kwargs or {"seed": int(params["seed"])}))
    basis = {
        "evaluated_at": "sites",
        "site_records": reports.site_records,
        "missing": reports.missing,
    }
    return result, metric, updates, basis


def _recorded(event_names, subject_type: str, subject_id) -> bool:
    return bool(subjects_recorded(event_names, subject_type, [str(subject_id)]))


def _round_recorded(round_id) -> bool:
    """Whether the round has its ``contribution.scored`` or ``contribution.unavailable``."""
    return _recorded(
        (ledger_events.CONTRIBUTION_SCORED, ledger_events.CONTRIBUTION_UNAVAILABLE),
        _ROUND_LABEL,
        round_id,
    )


def round_score(round_id: int) -> str:
    """Score a closed round and record it (see the module docstring). Never raises: the round
    is closed whatever happens here. Returns ``"scored"``, ``"unavailable"``, ``"already"``
    or ``"error"``."""
    try:
        rnd = round_with_job(round_id)
        if rnd is None or rnd.state != Round.State.CLOSED:
            return "error"
        if _round_recorded(rnd.pk):
            return "already"
        if site_evaluation.evaluates_at_sites(rnd.job):
            pending = _site_evaluation_pending(rnd)
            if pending:
                return pending
        started = time.perf_counter()
        try:
            result, metric, updates, basis = round_contributions(rnd)
        except ScoringUnavailable as exc:
            return _record_unavailable(rnd, str(exc))
        except SoftTimeLimitExceeded:
            # The scoring task's limit, under the broker's consumer timeout: killed at the hard
            # one, the task would be delivered again and fail the same way, round after round.
            log.exception("scoring the contributions of %s ran out of time", rnd)
            return _record_unavailable(
                rnd, "scoring took longer than the scoring task's time limit"
            )
        except Exception as exc:  # noqa: BLE001 - scoring must never fail a closed round
            log.exception("scoring the contributions of %s failed", rnd)
            return _record_unavailable(rnd, f"scoring failed: {exc}")
        seconds = time.perf_counter() - started
        outcome = _record_scores(rnd, result, metric, updates, basis)
        log.info(
            "%s: %s by %s, %d evaluations in %.2f s",
            rnd,
            result.method,
            metric,
            result.evaluations,
            seconds,
        )
        return outcome
    except Exception:  # noqa: BLE001 - e.g. the database went away: the command can redo it
        log.exception("recording the contributions of round #%s failed", round_id)
        return "error"


def _site_evaluation_pending(rnd: Round) -> str:
    """For a round evaluated at the sites: ask them if nobody has yet (``"requested"``), wait
    while they report (``"pending"``), or ``""`` once their evaluation is closed and the round
    can be scored. A failure to ask is recorded as the reason the round has no scores."""
    state = RoundEvaluation.objects.filter(round=rnd).values_list("state", flat=True).first()
    if state is None:
        try:
            outcome = site_evaluation.evaluation_request(
                rnd.pk, seed=round_seed(rnd.job, rnd.index)
            )
        except Exception as exc:  # noqa: BLE001 - a closed round must never fail here
            log.exception("asking the sites to evaluate %s failed", rnd)
            return _record_unavailable(rnd, f"the sites could not be asked to evaluate: {exc}")
        return outcome if outcome != "already" else "pending"
    if state != RoundEvaluation.State.CLOSED:
        return "pending"
    return ""


def round_score_claimed(round_id: int, *, now=None) -> str:
    """Score a round sent to the scoring queue (the ``training.round_score`` task, on the
    scoring worker): take the round's lease (:func:`training.rounds.scoring_queue.
    scoring_claim`), score it while a thread renews the lease (:func:`round_score`), let the
    lease go. Returns :func:`round_score`'s outcome, ``"already"`` for a round recorded before
    (a second message), or ``"busy"`` when another scorer holds the round. A scorer killed here
    leaves its lease unrenewed: the periodic pass sends the round again once it runs out
    (``FL_CLAIM_LEASE_SECONDS``). Never raises but for the database (the task retries)."""
    if _round_recorded(round_id):
        return "already"
    token = scoring_queue.scoring_claim(round_id, now=now)
    if token is None:
        return "busy"
    try:
        with RoundLease(round_id, token):
            return round_score(round_id)
    finally:
        scoring_queue.scoring_release(round_id, token)


def evaluation_close_and_score(round_id: int, *, now=None) -> str:
    """Close a round's evaluation at the sites if it is done (the
    ``training.round_evaluation_maybe_close`` task, sent after each site's report); the close
    sends the round to the scoring queue in its transaction
    (:func:`training.rounds.site_evaluation.evaluation_maybe_close`), so the coordinator's
    worker scores nothing here."""
    return site_evaluation.evaluation_maybe_close(round_id, now=now)


#: How far back the periodic pass looks for unscored rounds and job totals (older ones:
#: ``manage.py score_contributions --job ID``), and how many rounds it sends to the scoring
#: queue again per pass.
RESCORE_WINDOW = dt.timedelta(hours=24)
RESCORE_PER_PASS = 5


def rescore_missing(*, now=None) -> dict[str, list[int]]:
    """Send to the scoring queue again the closed rounds left unscored whose lease ran out (a
    lost message, a scoring worker that died: :func:`training.rounds.scoring_queue.
    scoring_resend`, which says how re-sends are spaced), and write the totals of completed
    jobs whose rounds are all scored but whose ``contribution.job_scored`` was never written.
    Scores nothing itself: it runs in the coordinator's periodic pass, on ``central``."""
    now = now or timezone.now()
    since = now - RESCORE_WINDOW
    closed = list(
        Round.objects.filter(state=Round.State.CLOSED, closed_at__gte=since)
        # A scoring worker that holds the round renews its lease; a queued round's lease lasts
        # as long as its message may wait. Either way: not ours to send again yet.
        .filter(Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=now))
        # Waiting for the sites' evaluations is not a loss: their close sends the round.
        .exclude(evaluation__state=RoundEvaluation.State.COLLECTING)
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    recorded = {
        int(pk)
        for pk in subjects_recorded(
            [ledger_events.CONTRIBUTION_SCORED, ledger_events.CONTRIBUTION_UNAVAILABLE],
            _ROUND_LABEL,
            [str(pk) for pk in closed],
        )
    }
    done: dict[str, list[int]] = {"scoring_resent": [], "totals": []}
    for round_id in [pk for pk in closed if pk not in recorded][:RESCORE_PER_PASS]:
        if scoring_queue.scoring_resend(round_id, now=now):
            log.warning("round #%s is still unscored: sent to the scoring queue again", round_id)
            done["scoring_resent"].append(round_id)
    jobs = list(
        TrainingJob.objects.filter(state=JobState.COMPLETED, state_changed_at__gte=since)
        .select_related("consortium")
        .order_by("pk")
    )
    totals = set(
        subjects_recorded(
            [ledger_events.CONTRIBUTION_JOB_SCORED], _JOB_LABEL, [str(j.pk) for j in jobs]
        )
    )
    for job in jobs:
        if str(job.pk) in totals:
            continue
        with transaction.atomic():
            lock_chain()
            _maybe_job_total(job)
        if _recorded((ledger_events.CONTRIBUTION_JOB_SCORED,), _JOB_LABEL, job.pk):
            done["totals"].append(job.pk)
    return done


def scores_tick(*, now=None) -> dict[str, list[int]]:
    """The coordinator's periodic pass over scores, on ``central``, where nothing is scored:
    send again the lost evaluation tasks of the sites, close the evaluations past their
    deadline (each close sends its round to the scoring queue), and send again the rounds a
    lost message or a dead scoring worker left unscored, which asks the sites for the
    evaluations a scorer died before asking for too (:func:`rescore_missing`)."""
    now = now or timezone.now()
    done = site_evaluation.evaluations_tick(now=now)
    done.update(rescore_missing(now=now))
    return done


def _record_unavailable(rnd: Round, reason: str) -> str:
    job = rnd.job
    with transaction.atomic():
        lock_chain()
        if _round_recorded(rnd.pk):
            return "already"
        append_entry(
            event=ledger_events.CONTRIBUTION_UNAVAILABLE,
            subject=rnd,
            consortium_slug=job.consortium.slug,
            payload={"job_id": job.pk, "round": rnd.index, "reason": reason[:2000]},
        )
        _maybe_job_total(job)
    return "unavailable"


def _record_scores(
    rnd: Round, result, metric: str, updates: list[SiteUpdate], basis: dict | None = None
) -> str:
    job = rnd.job
    institutions = {u.institution.slug: u.institution for u in updates}
    with transaction.atomic():
        lock_chain()
        if _round_recorded(rnd.pk):
            return "already"
        entry = append_entry(
            event=ledger_events.CONTRIBUTION_SCORED,
            subject=rnd,
            consortium_slug=job.consortium.slug,
            payload={
                "job_id": job.pk,
                "round": rnd.index,
                "method": result.method,
                "params": dict(result.params),
                "metric": metric,
                "sites": sorted(result.players),
                "coalitions": result.coalitions(),
                "scores": {slug: result.scores[slug] for slug in sorted(result.scores)},
                "evaluations": result.evaluations,
                **(basis or {}),
            },
        )
        ContributionScore.objects.bulk_create(
            ContributionScore(
                job=job,
                round=rnd,
                round_index=rnd.index,
                institution=institutions[slug],
                method=result.method,
                metric=metric,
                score=score,
                ledger_seq=entry.seq,
            )
            for slug, score in sorted(result.scores.items())
        )
        _maybe_job_total(job)
    return "scored"


def _maybe_job_total(job: TrainingJob) -> None:
    """Write ``contribution.job_scored`` once the job has completed and every closed round has
    been scored (or found unscorable). In the caller's transaction, under the ledger lock."""
    state = TrainingJob.objects.filter(pk=job.pk).values_list("state", flat=True).first()
    if state != JobState.COMPLETED:
        return
    if _recorded((ledger_events.CONTRIBUTION_JOB_SCORED,), _JOB_LABEL, job.pk):
        return
    closed = set(
        Round.objects.filter(job=job, state=Round.State.CLOSED).values_list("pk", flat=True)
    )
    done = {
        int(pk)
        for pk in subjects_recorded(
            [ledger_events.CONTRIBUTION_SCORED, ledger_events.CONTRIBUTION_UNAVAILABLE],
            _ROUND_LABEL,
            [str(pk) for pk in closed],
        )
    }
    if closed - done:
        return  # a round is still to be scored: the last one to be writes the total
    rows = list(
        ContributionScore.objects.filter(job=job)
        .order_by("round_index", "institution__slug")
        .values_list("institution__slug", "score", "method", "metric")
    )
    if not rows:
        return  # nothing could be scored: the unavailable entries say why
    totals: dict[str, float] = defaultdict(float)
    rounds: dict[str, int] = defaultdict(int)
    for slug, score, _method, _metric in rows:
        totals[slug] += score
        rounds[slug] += 1
    methods = {m for _s, _v, m, _x in rows}
    metrics = {x for _s, _v, _m, x in rows}
    append_entry(
        event=ledger_events.CONTRIBUTION_JOB_SCORED,
        subject=job,
        consortium_slug=job.consortium.slug,
        payload={
            "job_id": job.pk,
            "method": methods.pop() if len(methods) == 1 else MIXED,
            "metric": metrics.pop() if len(metrics) == 1 else MIXED,
            "scores": {slug: totals[slug] for slug in sorted(totals)},
            "rounds": {slug: rounds[slug] for slug in sorted(rounds)},
        },
    )


def job_score_missing(job_id: int) -> dict[int, str]:
    """Score every closed round of the job that has no contribution entry yet (a round older
    than the periodic pass's window that a lost message or a dead scoring worker left unscored,
    or a job run before scoring existed), in this process, then the job's total if it has
    completed. Returns ``{round index: outcome}``."""
    job = TrainingJob.objects.select_related("consortium").get(pk=job_id)
    outcomes = {}
    for pk, index in (
        Round.objects.filter(job=job, state=Round.State.CLOSED)
        .order_by("index")
        .values_list("pk", "index")
    ):
        outcomes[index] = round_score(pk)
    with transaction.atomic():
        lock_chain()
        _maybe_job_total(job)
    return outcomes
