"""Evaluation at the sites: a round's metric and its contribution scores without central data
(docs/architecture.md, section 4, step 3).

A job whose spec evaluates at the ``sites`` (``training.jobs.spec.evaluation_settings``: the
default whenever the data set is not a bundled one) has no validation set at the centre. So,
after each round closes, the coordinator:

1. (on the scoring worker, from the round's ``training.round_score`` message) plans the
   coalitions its contribution method needs, at most the spec's ``max_models``
   (:func:`training.fl.contribution.plan_coalitions`), builds each coalition's model from the
   sites' shared updates exactly as central scoring does
   (:class:`training.fl.coalition.CoalitionUtility`), stores them as artifacts, and asks every
   active participant to evaluate them and the round's model (:func:`evaluation_request`:
   ``RoundEvaluation`` and one ``SiteEvaluation`` per site, the ledger's
   ``evaluation.requested``, then one ``training.site_evaluate`` task per site queue). Where
   contribution estimator 3 can serve (a classification job's averaged rounds whose updates
   keep the coalitions in their span, ``training.fl.coalition_surrogate``), a sampled method
   plans estimator 2's coalitions and the plan's ``surrogate`` asks each site to make the
   surrogate on its own share too, from models it evaluates anyway: the empty coalition's
   and each site's own (:func:`_surrogate_ask`);
2. takes each site's signed report (``training.rounds.evaluation_intake``, behind ``POST
   /api/site/.../rounds/<index>/evaluation/``): the report must name exactly the models asked,
   carry finite figures and a record count no larger than the site's registered data set, and
   verify against the site's registered key; it is written to the ledger verbatim
   (``evaluation.reported``, text and signature), so anyone can check it later;
3. closes the evaluation once every site asked has reported, or at its deadline (the spec's
   round timeout after the request) with whatever came in (:func:`evaluation_maybe_close`):
   the round's metrics are the sites' figures weighted by their records (``round.evaluated``,
   and the round's ``GlobalModel.metrics``), the sites that did not report are named, and the
   contribution scores are computed from the same reports (with estimator 3 when every
   reporting site sent its surrogate, weighted by records as the values are)
   (:func:`training.rounds.contributions.round_score`, whose ``contribution.scored`` entry
   then says ``evaluated_at: "sites"``, on which sites' records the values rest, and which
   sites were missing), on the scoring worker: the close sends the round to the ``scoring``
   queue in its own transaction (:mod:`training.rounds.scoring_queue`).

Training does not wait for it: the next round opens when the round closes, and the site's
queue runs the evaluation and the next round's training one after the other. Every step is a
compare-and-set on our own rows, safe to run twice; :func:`evaluations_tick` (from the
coordinator's periodic pass) sends again a site task that has not reported and closes
evaluations past their deadline; a round whose evaluation was never requested (its scoring
message lost, its scorer dead) is unscored with its lease run out, so the periodic pass sends
it to the scoring queue again (``training.rounds.contributions.rescore_missing``), whose
worker requests it.

What a site learns: a coalition model is built from other sites' shared updates, so a site
that evaluates it sees (a function of) those updates, which it would not with central
evaluation. The approver's review page says so (``training.jobs.describe``).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from training import outbox, queues
from training.fl.evaluation_report import (
    EvaluationReport,
    combine,
    combine_surrogates,
    parse_report,
)
from training.jobs.spec import (
    EVALUATION_SITES,
    aggregation_of,
    contribution_settings,
    evaluation_settings,
    loss_of,
)
from training.models import (
    JobParticipant,
    Round,
    RoundEvaluation,
    SiteEvaluation,
    TrainingJob,
)
from training.rounds import scoring_queue
from training.rounds.aggregation import accepted_updates

log = logging.getLogger(__name__)

__all__ = [
    "evaluates_at_sites",
    "evaluation_maybe_close",
    "evaluation_request",
    "evaluations_tick",
    "reported_evaluations",
]

#: How a round's coalition models are marked in ``RoundEvaluation.asked_models``.
ROLE_GLOBAL = "global"
ROLE_COALITION = "coalition"


def evaluates_at_sites(job: TrainingJob) -> bool:
    return evaluation_settings(job.spec)["where"] == EVALUATION_SITES


# --- 1. Asking the sites ------------------------------------------------------------------------


def _plan(
    job: TrainingJob, players: list[str], seed: int, *, estimator: int | None
) -> tuple[str, dict, list]:
    from training.fl.contribution import plan_coalitions

    settings_ = contribution_settings(job.spec)
    method, params, coalitions = plan_coalitions(
        settings_["method"],
        players,
        max_models=evaluation_settings(job.spec)["max_models"],
        permutations=settings_.get("permutations", 1),
        truncation=settings_.get("truncation", 0.0),
        tolerance=settings_.get("tolerance", 0.0),
        seed=seed,
        estimator=estimator,
    )
    return method, params, coalitions


def _coalition_utility(rnd: Round, job: TrainingJob):
    """The round's coalitions, as central scoring builds them (no validation records: the
    sites hold them)."""
    # Lazy torch: the engine's modules load it, and only the coordinator pays for it.
    import torch

    from training.fl.coalition import CoalitionUtility
    from training.rounds.states import build_model, dataset_of, load_state, load_update

    spec = job.spec
    shared = {}
    for update in accepted_updates(rnd):
        delta, mask = load_update(update.update_digest)
        shared[update.institution.slug] = (delta, mask or None, update.samples)
    dataset = dataset_of(job, spec)
    return CoalitionUtility(
        base_state=load_state(rnd.global_model_in.digest),
        updates=shared,
        model=build_model(spec, dataset),
        x=torch.empty(0),
        y=torch.empty(0),
        modality=dataset.modality,
        combine="sum" if spec["topology"] == "cyclic" else "mean",
        loss=loss_of(spec),
        zero_filled=aggregation_of(spec) == "zero_filled_mean",
    )


def _build_models(rnd: Round, utility, coalitions: list) -> list[dict]:
    """Store each coalition's model; ``[{"digest", "sites", "role"}]`` with the round's model."""
    from training.rounds.states import store_state

    rows = [
        {
            "digest": rnd.global_model_out.digest,
            "sites": list(utility.sites),
            "role": ROLE_GLOBAL,
        }
    ]
    for coalition in coalitions:
        state = {name: t.detach().clone() for name, t in utility.state_of(coalition).items()}
        digest, _size = store_state(state)
        rows.append({"digest": digest, "sites": sorted(coalition), "role": ROLE_COALITION})
    return rows


def _surrogate_ask(utility, rows: list[dict]) -> dict | None:
    """What a site needs to make contribution estimator 3's surrogate on its own share
    (``training.site.evaluation``): the players, their weights (the records each update
    counted for), and the digests of the empty coalition's model (the round's input model)
    and of each site's own (the input model plus its shared change), all among the models it
    evaluates anyway, so that the site rebuilds every update as one minus the other. None
    when a model it needs is not in the plan."""
    by_sites = {tuple(r["sites"]): r["digest"] for r in rows if r["role"] == ROLE_COALITION}
    players = list(utility.sites)
    if () not in by_sites or any((p,) not in by_sites for p in players):
        return None
    return {
        "players": players,
        "weights": [float(utility.updates[p][2]) for p in players],
        "base": by_sites[()],
        "singletons": {p: by_sites[(p,)] for p in players},
    }


def evaluation_request(round_id: int, *, seed: int) -> str:
    """Ask the sites to evaluate a closed round's models (see the module docstring); ``seed``
    is the contribution method's (``training.rounds.contributions.round_seed``). Returns
    ``"requested"``, ``"already"``, ``"not_closed"`` or ``"not_sites"``; raises when the models
    cannot be built (the caller records why the round cannot be scored)."""
    rnd = (
        Round.objects.select_related("job__consortium", "global_model_in", "global_model_out")
        .filter(pk=round_id)
        .first()
    )
    if rnd is None or rnd.state != Round.State.CLOSED or rnd.global_model_out is None:
        return "not_closed"
    job = rnd.job
    if not evaluates_at_sites(job):
        return "not_sites"
    if RoundEvaluation.objects.filter(round=rnd).exists():
        return "already"
    from training.fl.coalition_surrogate import surrogate_out_of_reach
    from training.fl.contribution import ESTIMATOR_PAIRED, SHAPLEY_SAMPLED

    utility = _coalition_utility(rnd, job)
    players = list(utility.sites)
    # Where the sites can make contribution estimator 3's surrogate, a sampled method plans
    # estimator 2's coalitions (the ones estimator 3 corrects), whatever the number of sites.
    correctable = not surrogate_out_of_reach(utility)
    method, params, coalitions = _plan(
        job, players, seed, estimator=ESTIMATOR_PAIRED if correctable else None
    )
    asked_models = _build_models(rnd, utility, coalitions)
    plan = {"method": method, "params": params, "players": players}
    if correctable and method == SHAPLEY_SAMPLED and params.get("estimator") == ESTIMATOR_PAIRED:
        ask = _surrogate_ask(utility, asked_models)
        if ask is not None:
            plan["surrogate"] = ask
    now = timezone.now()
    deadline = now + dt.timedelta(seconds=int(job.spec["round_timeout_seconds"]))
    with transaction.atomic():
        lock_chain()
        if RoundEvaluation.objects.filter(round=rnd).exists():
            return "already"
        participants = list(
            JobParticipant.objects.filter(job=job, status=JobParticipant.Status.ACTIVE)
            .select_related("institution")
            .order_by("institution__slug")
        )
        evaluation = RoundEvaluation.objects.create(
            round=rnd,
            global_digest=rnd.global_model_out.digest,
            asked_models=asked_models,
            plan=plan,
            requested_at=now,
            deadline=deadline,
        )
        SiteEvaluation.objects.bulk_create(
            SiteEvaluation(evaluation=evaluation, institution=p.institution, sent_at=now)
            for p in participants
        )
        append_entry(
            event=ledger_events.EVALUATION_REQUESTED,
            subject=rnd,
            consortium_slug=job.consortium.slug,
            payload={
                "job_id": job.pk,
                "round": rnd.index,
                "global_digest": evaluation.global_digest,
                "models": asked_models,
                "plan": evaluation.plan,
                "sites": [p.institution.slug for p in participants],
                "deadline": deadline.isoformat(),
            },
        )
        for participant in participants:
            _send_evaluate_task(job, rnd.index, participant.institution.slug)
    log.info(
        "%s: %d model(s) sent to %d site(s) for evaluation (%s)",
        rnd,
        len({m["digest"] for m in asked_models}),
        len(participants),
        method,
    )
    return "requested"


def _send_evaluate_task(job: TrainingJob, round_index: int, slug: str) -> None:
    kwargs = {
        "job_id": job.pk,
        "round_index": round_index,
        "site": slug,
        "spec_digest": job.spec_digest,
    }
    outbox.send_after_commit(queues.SITE_EVALUATE, kwargs=kwargs, queue=queues.site_queue(slug))


# --- 3. Closing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteReports:
    """The reports a closed (or closing) evaluation rests on."""

    evaluation: RoundEvaluation
    reports: list[EvaluationReport]
    missing: list[str]

    @property
    def site_records(self) -> dict[str, int]:
        return {r.site: r.records for r in sorted(self.reports, key=lambda r: r.site)}

    def values(self, metric: str) -> dict[str, float]:
        """Each model's ``metric``, weighted by the reporting sites' records."""
        return combine(self.reports, metric)

    def surrogate(self) -> list[float] | None:
        """Every coalition's surrogate value, weighted as :meth:`values` (None unless every
        reporting site sent one)."""
        return combine_surrogates(self.reports)


def reported_evaluations(rnd: Round) -> SiteReports | None:
    """The sites' reports on a round's models, or None when no evaluation was requested."""
    evaluation = RoundEvaluation.objects.filter(round=rnd).first()
    if evaluation is None:
        return None
    rows = list(evaluation.site_evaluations.select_related("institution"))
    reports = [
        parse_report(r.report_text) for r in rows if r.status == SiteEvaluation.Status.REPORTED
    ]
    missing = sorted(r.institution.slug for r in rows if r.status != SiteEvaluation.Status.REPORTED)
    return SiteReports(evaluation=evaluation, reports=reports, missing=missing)


def evaluation_maybe_close(round_id: int, *, now: dt.datetime | None = None) -> str:
    """Close a round's evaluation when every site asked has reported or its deadline passed,
    record the round's metrics, and send the round to the scoring queue in the same
    transaction (:func:`training.rounds.scoring_queue.scoring_send`: its contributions are
    scored from the reports on the scoring worker). Returns ``"closed"``, ``"waiting"`` or
    ``"not_collecting"``."""
    now = now or timezone.now()
    evaluation = (
        RoundEvaluation.objects.select_related("round__job__consortium", "round__global_model_out")
        .filter(round_id=round_id)
        .first()
    )
    if evaluation is None or evaluation.state != RoundEvaluation.State.COLLECTING:
        return "not_collecting"
    waiting = evaluation.site_evaluations.filter(status=SiteEvaluation.Status.ASKED).exists()
    if waiting and now < evaluation.deadline:
        return "waiting"
    rnd = evaluation.round
    job = rnd.job
    with transaction.atomic():
        lock_chain()
        moved = RoundEvaluation.objects.filter(
            pk=evaluation.pk, state=RoundEvaluation.State.COLLECTING
        ).update(state=RoundEvaluation.State.CLOSED, closed_at=now)
        if not moved:
            return "not_collecting"
        evaluation.site_evaluations.filter(status=SiteEvaluation.Status.ASKED).update(
            status=SiteEvaluation.Status.MISSING
        )
        reports = reported_evaluations(rnd)
        assert reports is not None  # noqa: S101 - it was just read above
        metrics = _round_metrics(reports, evaluation.global_digest)
        model = rnd.global_model_out
        model.metrics = metrics
        model.save(update_fields=["metrics"])
        append_entry(
            event=ledger_events.ROUND_EVALUATED,
            subject=rnd,
            consortium_slug=job.consortium.slug,
            payload={
                "job_id": job.pk,
                "round": rnd.index,
                "global_digest": evaluation.global_digest,
                "metrics": metrics,
                "site_records": reports.site_records,
                "missing": reports.missing,
            },
        )
        scoring_queue.scoring_send(rnd.pk, now=now)
    if reports.missing:
        log.warning("%s: evaluation closed without %s", rnd, ", ".join(reports.missing))
    return "closed"


def _round_metrics(reports: SiteReports, global_digest: str) -> dict:
    if not reports.reports:
        return {
            "validation": "unavailable: no site reported its evaluation in time "
            f"(asked: {', '.join(reports.missing)})"
        }
    names = sorted(set.intersection(*(set(r.results[global_digest]) for r in reports.reports)))
    metrics: dict = {}
    for name in names:
        metrics["validation_" + name] = reports.values(name)[global_digest]
    records = sum(r.records for r in reports.reports)
    metrics["validation_records"] = records
    metrics["validation_sites"] = len(reports.reports)
    return metrics


# --- The periodic pass --------------------------------------------------------------------------


def evaluations_tick(*, now: dt.datetime | None = None) -> dict[str, list[int]]:
    """Send again the task of a site that has not reported after
    ``FL_REDISPATCH_AFTER_SECONDS``, and close the evaluations past their deadline (``closed``:
    their rounds' ids; each close sent its round to the scoring queue)."""
    now = now or timezone.now()
    done: dict[str, list[int]] = {"resent": [], "closed": []}
    after = dt.timedelta(seconds=getattr(settings, "FL_REDISPATCH_AFTER_SECONDS", 300))
    for row in SiteEvaluation.objects.filter(
        status=SiteEvaluation.Status.ASKED,
        evaluation__state=RoundEvaluation.State.COLLECTING,
        sent_at__lte=now - after,
    ).select_related("evaluation__round__job", "institution"):
        with transaction.atomic():
            if SiteEvaluation.objects.filter(pk=row.pk, sent_at=row.sent_at).update(sent_at=now):
                job = row.evaluation.round.job
                _send_evaluate_task(job, row.evaluation.round.index, row.institution.slug)
                done["resent"].append(row.pk)
    for round_id in list(
        RoundEvaluation.objects.filter(
            state=RoundEvaluation.State.COLLECTING, deadline__lte=now
        ).values_list("round_id", flat=True)
    ):
        if evaluation_maybe_close(round_id, now=now) == "closed":
            done["closed"].append(round_id)
    return done
