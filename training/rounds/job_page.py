"""What the job page shows besides its live progress: the summary at its top, each round's
sites (duration, status, reason of a rejection), and the job's model with its lineage.

Why a module of its own: the page used to be one long column of sections (about 5,000 px); a
reader who wants "where is it, how good is it, how much privacy did it cost, whom does it wait
on" now finds those in the summary, computed here from the same live state the progress panel
draws (:func:`training.rounds.waiting.job_page_state`), so the two never disagree. The round
tables and the model read their own rows; a constant number of queries whatever the number of
rounds and sites.

Storage locations are given as the artifact store's relative name (``aa/bb/<digest>``), never
a host path: every member who may see the job reads this page.
"""

from __future__ import annotations

import json

from training.jobs.accounting import PrivacyEvent
from training.jobs.guarantees import NO_MECHANISM, guarantee_for_events, mechanism_names
from training.jobs.selectors import JobAccountability, current_decisions
from training.models import (
    GlobalModel,
    JobState,
    PrivacyReservation,
    Round,
    SiteUpdate,
    TrainingJob,
)
from training.rounds.artifacts import artifact_store
from training.rounds.liveness_words import duration_words

__all__ = ["job_guarantees", "job_model", "job_round_tables", "job_summary"]

_UPDATE_LABELS = dict(SiteUpdate.Status.choices)
_UPDATE_TONES = {
    SiteUpdate.Status.ACCEPTED: "ok",
    SiteUpdate.Status.REJECTED: "bad",
    SiteUpdate.Status.STRAGGLER: "warn",
    SiteUpdate.Status.DISPATCHED: "",
}
_METRIC_WORDS = {"validation_accuracy": "accuracy", "validation_dice": "Dice score"}


def _metric_words(metric: str) -> str:
    return _METRIC_WORDS.get(metric, metric.replace("validation_", "").replace("_", " "))


def job_summary(job: TrainingJob, *, state: dict, account: JobAccountability) -> dict:
    """The page's summary, in words: ``rounds`` ("3 of 5 rounds closed"), ``metric`` (the
    global model's latest validation metric, or None), ``privacy`` (each participant's ε spent
    against its cap), ``waiting`` (whom the job waits on, or "") and ``guarantees`` (what the
    job's ε rests on, :func:`job_guarantees`, shown where the page says what leaves each site)."""
    live = state["job"]
    series = state["series"]
    metric = None
    if series["metric"]:
        points = [
            (r, v)
            for r, v in zip(series["rounds"], series["validation"], strict=True)
            if v is not None
        ]
        if points:
            index, value = points[-1]
            metric = {
                "name": _metric_words(series["metric"]),
                "value": value,
                "round": index,
                "initial": points[0][1] if points[0][0] == 0 and index != 0 else None,
            }
    current = state["round"]
    rounds = f"{live['rounds_closed']} of {live['rounds_total']} rounds closed"
    if current and job.state == JobState.RUNNING and current["state"] != Round.State.CLOSED:
        rounds += f"; round {current['index']}: {current['state_label'].lower()}"
    privacy = [_privacy_row(row) for row in account.rows]
    return {
        "rounds": rounds,
        "metric": metric,
        "privacy": privacy,
        "waiting": _waiting_words(job, state),
        "guarantees": job_guarantees(job),
    }


def job_guarantees(job: TrainingJob) -> dict:
    """What the job's formal ε rests on (:mod:`training.jobs.guarantees`), from the events each
    participant's live reservation holds (what the budget check charged, at the reservation's δ).

    ``names``: the pipeline's DP mechanisms in words (known before any budget is reserved);
    ``none``: the sentence for a pipeline without any; ``groups``: one guarantee per distinct
    set of figures, with the institutions it is theirs. Only DP-SGD's ε depends on a site's
    number of records, so most jobs have one group, the job-level statement with its
    participants named; sites of different sizes under DP-SGD get one each. One query.
    """
    names = mechanism_names(job.spec)
    version = job.agreement_version if job.agreement_version_id else None
    cap = float(version.epsilon_cap) if version is not None else None
    groups: list[dict] = []
    reservations = (
        job.reservations.exclude(status=PrivacyReservation.Status.RELEASED)
        .select_related("institution")
        .order_by("institution__name")
    )
    for reservation in reservations:
        try:
            events = [PrivacyEvent.from_json(e) for e in json.loads(reservation.events_text)]
            guarantee = guarantee_for_events(events, delta=reservation.delta, cap=cap)
        except (ValueError, TypeError):  # pragma: no cover - reservations are validated
            continue
        key = (
            tuple((m.name, m.epsilon_text) for m in guarantee.mechanisms),
            guarantee.epsilon_text,
            guarantee.delta,
        )
        for group in groups:
            if group["key"] == key:
                group["institutions"].append(reservation.institution.name)
                break
        else:
            groups.append(
                {"key": key, "institutions": [reservation.institution.name], "guarantee": guarantee}
            )
    for group in groups:
        group["where"] = ", ".join(group.pop("institutions"))
        del group["key"]
    return {
        "names": names,
        "none": "" if names else NO_MECHANISM[0].upper() + NO_MECHANISM[1:] + ".",
        "groups": groups,
    }


def _privacy_row(row) -> dict:
    share = (
        min(1.0, row.epsilon_total / row.cap) if row.epsilon_total is not None and row.cap else 0.0
    )
    return {
        "institution": row.institution.name,
        "job": row.epsilon_job,
        "total": row.epsilon_total,
        "cap": row.cap,
        "share": share,
        "percent": round(100 * share),
    }


def _waiting_words(job: TrainingJob, state: dict) -> str:
    if job.state == JobState.AWAITING_APPROVAL:
        decided = current_decisions(job)
        awaited = [
            p.institution.name
            for p in job.participants.all()
            if p.status == p.Status.ACTIVE and p.institution_id not in decided
        ]
        if awaited:
            return "The decision of " + ", ".join(awaited)
        return ""
    if job.state == JobState.DRAFT:
        return "Its proposer: a draft is submitted for approval from this page."
    waiting = state.get("waiting") or {}
    names = [s["institution"] for s in waiting.get("sites", [])]
    if waiting.get("coordinator"):
        return waiting["coordinator"]["text"]
    if names:
        return ", ".join(names)
    return waiting.get("summary", "")


def job_round_tables(job: TrainingJob) -> list[dict]:
    """Each round, newest first, with each site's task: when it was sent, when its update
    came back, how long that took, its status and the reason of a rejection. Two queries."""
    rounds = list(job.rounds.order_by("-index"))
    updates: dict[int, list] = {r.pk: [] for r in rounds}
    for u in (
        SiteUpdate.objects.filter(round__job=job)
        .select_related("institution")
        .order_by("institution__name")
    ):
        took = duration_words(u.received_at - u.sent_at) if u.received_at and u.sent_at else None
        updates[u.round_id].append(
            {
                "institution": u.institution.name,
                "status": u.status,
                "status_label": _UPDATE_LABELS.get(u.status, u.status),
                "tone": _UPDATE_TONES.get(u.status, ""),
                "sent_at": u.sent_at,
                "received_at": u.received_at,
                "duration": took,
                "samples": u.samples if u.status == SiteUpdate.Status.ACCEPTED else None,
                "reason": u.reject_reason,
            }
        )
    return [
        {
            "index": r.index,
            "state": r.state,
            "state_label": r.get_state_display(),
            "opened_at": r.opened_at,
            "closed_at": r.closed_at,
            "duration": duration_words(r.closed_at - r.opened_at) if r.closed_at else None,
            "failure_reason": r.failure_reason,
            "sites": updates[r.pk],
            "accepted": sum(1 for u in updates[r.pk] if u["status"] == SiteUpdate.Status.ACCEPTED),
        }
        for r in rounds
    ]


def job_model(job: TrainingJob) -> dict | None:
    """The job's newest global model (its final one once the job completed): where it is
    stored, its digest, size and lineage (each version back to the initial model). None
    before the initial model is built."""
    models = list(
        GlobalModel.objects.filter(job=job).select_related("parent").order_by("-round_index")
    )
    if not models:
        return None
    latest = models[0]
    store = artifact_store()
    stored = store.exists(latest.digest)
    return {
        "model": latest,
        "final": job.state == JobState.COMPLETED,
        "location": store.path_of(latest.digest) if stored else None,
        "stored": stored,
        "lineage": models,
    }
