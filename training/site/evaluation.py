"""The site's evaluation of a round's models on its own validation share (runs at the hospital).

When a job evaluates at the sites (``training.jobs.spec.evaluation_settings``), the coordinator
asks every participating site, after each round, to evaluate the round's model and the
coalition models its contribution scores need (at most the spec's ``max_models``). The task
(``training.site_evaluate`` on ``site.<slug>``) carries ids and the spec digest only; the site:

1. checks the job's spec against the digest, as for training
   (:func:`training.site.worker.job_spec`);
2. asks which models to evaluate (``GET .../rounds/<index>/evaluation/``): a 409 means nothing is
   asked of it now (a second delivery after it reported, an evaluation already closed), and
   the task ends with nothing to do;
3. loads its data and keeps aside the same validation share as its training tasks do
   (:func:`training.site.worker.holdout_of`): records it never trained on in this job;
4. fetches each model by digest (``GET .../models/<digest>/``), checks its SHA-256, measures it
   (:func:`training.fl.evaluate.evaluate`: accuracy and loss, or Dice and loss);
5. when the centre asks for it (``surrogate`` in the answer: contribution estimator 3), makes
   the surrogate value of every coalition on the same share (:func:`surrogate_on_share`);
6. signs the canonical report (:mod:`training.fl.evaluation_report`) with the site's key and
   posts it (``POST .../rounds/<index>/evaluation/``). Only figures leave the site.

torch is imported inside :func:`run_site_evaluation`, never when this module is imported (the
same rule as :mod:`training.site.worker`).
"""

from __future__ import annotations

import hashlib
import logging

from training.fl.evaluation_report import report_text
from training.fl.signing import sign_update
from training.site.client import CentralClient, CentralError, WorkerConfig
from training.site.ledger_witness import witness_ledger
from training.site.worker import (
    IntegrityFailure,
    WrongSite,
    holdout_of,
    job_spec,
    site_model,
    skipped_when,
)

log = logging.getLogger(__name__)

__all__ = ["NotEvaluatedHere", "run_site_evaluation"]

#: The codes of a 409 from the evaluation request that mean there is nothing to do.
_NOTHING_TO_DO = frozenset({"already_reported", "evaluation_closed", "not_asked"})


class NotEvaluatedHere(RuntimeError):
    """The job does not evaluate at the sites, or this site cannot keep a validation share."""


def run_site_evaluation(
    *,
    job_id: int,
    round_index: int,
    site: str,
    spec_digest: str,
    config: WorkerConfig | None = None,
    client: CentralClient | None = None,
) -> dict:
    """Evaluate the models the centre asks this site to evaluate after a round, and report.

    Returns ``{"status": "reported" | "duplicate" | "skipped", ...}``; raises
    :class:`WrongSite`, :class:`IntegrityFailure`, :class:`NotEvaluatedHere`,
    :class:`CentralError` or ``ValueError`` (local data or model problems)."""
    config = config or WorkerConfig.from_env()
    if site != config.site_slug:
        raise WrongSite(f"this worker serves site {config.site_slug!r}, not {site!r}")
    client = client or CentralClient(config)
    # The centre's ledger first, as before training: nothing is done for a centre whose
    # ledger was rewritten (LedgerRefused).
    witness_ledger(client, config)
    try:
        asked = client.evaluation_request(job_id, round_index)
    except CentralError as exc:
        skipped = skipped_when(
            exc,
            _NOTHING_TO_DO,
            what="evaluation",
            job_id=job_id,
            round_index=round_index,
            site=site,
        )
        if skipped:
            return skipped
        raise
    if asked.get("spec_digest") != spec_digest:
        raise IntegrityFailure(
            f"job #{job_id}'s spec digest is {str(asked.get('spec_digest'))[:12]}… on the "
            f"central server, not the {spec_digest[:12]}… this task carries"
        )
    models = [str(d) for d in asked.get("models") or []]
    if not models:
        raise IntegrityFailure(f"job #{job_id} round {round_index}: no model to evaluate")
    job = job_spec(client, config, job_id, spec_digest)
    spec = job.spec

    # Lazy torch (module docstring).
    from training.fl.data import load_site_data
    from training.fl.evaluate import evaluate
    from training.fl.local import pick_device
    from training.fl.serialization import unpack_tensors

    data = load_site_data(
        data_root=config.data_root, dataset_key=spec["dataset_key"], site_slug=site
    )
    split = holdout_of(data, spec=spec, spec_digest=spec_digest, site=site)
    if split is None:
        raise NotEvaluatedHere(f"job #{job_id} does not evaluate its models at the sites")
    _training, x_val, y_val = split
    model = site_model(job, data).to(pick_device())
    ask = asked.get("surrogate")
    wanted = _surrogate_models(ask, models) if ask else set()
    value = "loss" if (spec.get("contribution") or {}).get("value") == "loss" else "metric"
    results: dict[str, dict[str, float]] = {}
    kept = {}
    for digest in models:
        body = client.model(job_id, digest)
        if hashlib.sha256(body).hexdigest() != digest:
            raise IntegrityFailure(f"the model sent as {digest[:12]}… does not hash to it")
        state = unpack_tensors(body)
        if digest in wanted:
            kept[digest] = state
        model.load_state_dict(state)
        results[digest] = evaluate(
            model,
            x_val,
            y_val,
            modality=data.modality,
            loss=spec.get("loss", "cross_entropy"),
            # A job valuing coalitions by their loss scores from this figure (neg_loss).
            negative_loss=value == "loss",
        )
    surrogate = None
    if ask:
        try:
            surrogate = surrogate_on_share(
                ask,
                kept,
                model,
                x_val,
                y_val,
                modality=data.modality,
                value=value,
                loss=spec.get("loss", "cross_entropy"),
            )
        except Exception:  # noqa: BLE001 - the report still counts without it (sample alone)
            log.warning("job #%s round %s: no surrogate made", job_id, round_index, exc_info=True)
    text = report_text(
        job_id=int(job_id),
        round_index=int(round_index),
        site=site,
        records=len(y_val),
        results=results,
        surrogate=surrogate,
    )
    signature = sign_update(config.signing_key_path.read_bytes(), text.encode("utf-8"))
    status, body = client.upload_evaluation(job_id, round_index, report=text, signature=signature)
    outcome = "duplicate" if body.get("duplicate") else "reported"
    log.info(
        "job #%s round %s: %d model(s) evaluated on %d records, report %s (HTTP %s)",
        job_id,
        round_index,
        len(results),
        len(y_val),
        outcome,
        status,
    )
    return {
        "status": outcome,
        "job_id": job_id,
        "round": round_index,
        "site": site,
        "models": len(results),
        "records": len(y_val),
        "surrogate": surrogate is not None,
    }


def _surrogate_models(ask: dict, models: list[str]) -> set[str]:
    """The digests the surrogate is rebuilt from; each must be among the models asked."""
    players = [str(p) for p in ask.get("players") or []]
    singletons = ask.get("singletons") or {}
    if not players or players != sorted(players) or set(singletons) != set(players):
        raise IntegrityFailure("the surrogate asked for names its sites inconsistently")
    wanted = {str(ask.get("base"))} | {str(singletons[p]) for p in players}
    if not wanted <= set(models):
        raise IntegrityFailure("the surrogate asked for rests on models not sent to evaluate")
    return wanted


def surrogate_on_share(ask: dict, states: dict, model, x, y, *, modality, value, loss):
    """Contribution estimator 3's surrogate of every coalition on this site's share (a list of
    2^n values by bit mask over the sorted sites; ``training.fl.coalition_surrogate``).

    Each site's shared change is its own model less the empty coalition's (the round's input
    model): the centre builds both that way (the mean of one update is the update), so the
    coalitions rebuilt here are the centre's."""
    from training.fl.coalition import CoalitionUtility

    base = states[ask["base"]]
    updates = {}
    for player, weight in zip(ask["players"], ask["weights"], strict=True):
        own = states[ask["singletons"][player]]
        delta = {k: own[k] - t for k, t in base.items() if t.is_floating_point()}
        updates[player] = (delta, None, float(weight))
    utility = CoalitionUtility(
        base_state=base,
        updates=updates,
        model=model,
        x=x,
        y=y,
        modality=modality,
        value=value,
        loss=loss,
    )
    return utility.surrogate()
