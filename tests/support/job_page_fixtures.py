"""A job with closed rounds and stored global models, for the job page's tests (its summary,
round tables, model block and charts), written directly as rows: what those tests check is the
page, not the coordinator that writes the rows.

Hospital A's update is accepted in every round; hospital B's is rejected in round 1 (with a
reason) and accepted after. Each round's global model is real bytes in the artifact store
(point the store at a test folder first: ``tests.support.fl_harness.use_artifact_folder``).
"""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from audit.ledger.chain import append_entry
from tests.support.liveness_fixtures import add_round, running_job
from training.jobs.transitions import job_transition
from training.models import GlobalModel, JobState, SiteUpdate
from training.rounds.artifacts import artifact_store

S = SiteUpdate.Status
REJECT_REASON = "the update's norm is above the agreed clipping bound"
ACCURACY = {0: 0.5, 1: 0.62, 2: 0.71, 3: 0.78, 4: 0.81, 5: 0.83, 6: 0.84}


def model_bytes(index: int) -> bytes:
    return f"packed tensors of round {index}".encode() * 32


def _model(job, index: int, parent) -> GlobalModel:
    digest = artifact_store().put(model_bytes(index))
    return GlobalModel.objects.create(
        job=job,
        round_index=index,
        digest=digest,
        lineage_hash=f"{index:x}" * 64,
        parent=parent,
        size_bytes=len(model_bytes(index)),
        metrics={"validation_accuracy": ACCURACY[index]},
    )


def _record_round(job, rnd, parent, model) -> None:
    """The ledger entries about the job a real round writes (the updates received, the
    round's closing), so the page's history is as long as a real job's."""
    entries = []  # (event, site or "", payload)
    for update in rnd.updates.select_related("institution"):
        site = update.institution.slug
        common = {"job_id": job.pk, "round": rnd.index, "site": site, "update_digest": "e" * 64}
        if update.status == S.ACCEPTED:
            extra = {"samples": update.samples, "privacy_events": [], "metrics": update.metrics}
            entries.append(("round.update_accepted", site, {**common, **extra, "pipeline": []}))
        else:
            extra = {"code": "clip_bound", "reason": update.reject_reason}
            entries.append(("round.update_rejected", site, {**common, **extra}))
    closed = {
        "job_id": job.pk,
        "round": rnd.index,
        "global_digest": model.digest,
        "parent_digest": parent.digest,
        "parent_lineage_hash": parent.lineage_hash,
        "lineage_hash": model.lineage_hash,
        "metrics": model.metrics,
    }
    entries.append(("round.closed", "", closed))
    for event, site, payload in entries:
        append_entry(
            event=event,
            actor_repr=f"site {site} worker" if site else "coordinator",
            subject=job,
            consortium_slug=job.consortium.slug,
            institution_slug=site,
            payload=payload,
        )


def job_with_rounds(scene, *, rounds: int = 3, complete: bool = True):
    """A running job (hospitals A and B) with ``rounds`` closed rounds and their models;
    completed when ``complete``."""
    cast = scene.cast
    job = running_job(scene)
    model = _model(job, 0, None)
    now = timezone.now()
    for index in range(1, rounds + 1):
        statuses = {cast.hospital_a: S.ACCEPTED, cast.hospital_b: S.ACCEPTED}
        if index == 1:
            statuses[cast.hospital_b] = S.REJECTED
        rnd = add_round(job, index, statuses, now=now - dt.timedelta(minutes=10 * (rounds - index)))
        for update in rnd.updates.all():
            accepted = update.status == S.ACCEPTED
            update.received_at = update.sent_at + dt.timedelta(seconds=90 + 30 * index)
            update.samples = 300 if accepted else 0
            update.metrics = {"train_loss_last_epoch": 1.0 / index} if accepted else {}
            update.reject_reason = "" if accepted else REJECT_REASON
            update.save()
        parent = model
        model = _model(job, index, model)
        rnd.global_model_out = model
        rnd.save(update_fields=["global_model_out"])
        _record_round(job, rnd, parent, model)
    if complete:
        job = job_transition(
            acting_user=None,
            job=job,
            to_state=JobState.COMPLETED,
            reason=f"all {rounds} rounds closed; final model {model.digest}",
        )
    return job
