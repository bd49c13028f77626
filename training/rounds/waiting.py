"""What a running job is waiting on, in words, for its page.

Why: a round that waits on a dead worker, or on a dead coordinator, used to read "collecting
updates" for as long as it lasted. The job page now says whom the round waits on and what is
known of them, from the site workers' heartbeats (:mod:`training.rounds.heartbeats`) and the
central services' (:func:`training.liveness.service_statuses`):

* an open round: each site still expected, and its worker's state ("Waiting on St Thomas'
  worker, offline for 4 min (last heard 09:12 UTC)", "Waiting on Barts' worker (online,
  training since 09:10 UTC)", "... which has never connected");
* a round being aggregated, or evaluated at the sites (each site still to report, the same
  way);
* the coordinator, when it is not heard from: nothing moves until it is back;
* the sites that missed the last N rounds in a row (:mod:`training.rounds.absences`).

Hostnames are never shown here: the job page is read by every member who may see the job; the
operators' services panel (the consortium dashboard) names hosts.

:func:`job_page_state` is the job page's live state with this added, for the page's first
render and its websocket alike (:mod:`training.web.consumers`), so a reload and a live update
say the same. The number of queries does not grow with the sites or the rounds.
"""

from __future__ import annotations

import datetime as dt

from django.utils import timezone

from training.liveness import service_statuses
from training.models import (
    JobState,
    Round,
    RoundEvaluation,
    SiteEvaluation,
    SiteUpdate,
    TrainingJob,
)
from training.rounds.absences import absent_sites
from training.rounds.heartbeats import SiteWorkers, site_workers
from training.rounds.live import job_live_state
from training.rounds.liveness_words import clock, duration_words, possessive

__all__ = ["job_page_state", "job_waiting", "waiting_on"]


def job_page_state(
    job: TrainingJob,
    *,
    account=None,
    now: dt.datetime | None = None,
    read_afresh: bool = True,
) -> dict:
    """:func:`training.rounds.live.job_live_state` with ``"waiting"``: :func:`job_waiting`.
    ``read_afresh=False``: ``job`` was read in this request (the job page), so neither reads it
    again."""
    state = job_live_state(job, account=account, read_afresh=read_afresh)
    state["waiting"] = job_waiting(job, now=now, read_afresh=read_afresh)
    return state


def waiting_on(
    name: str,
    workers: SiteWorkers | None,
    *,
    doing: str,
    since: dt.datetime | None,
    now: dt.datetime,
) -> dict:
    """One site the job waits on, with its worker's state: ``{"institution", "state",
    "label", "tone", "text"}``; ``state`` is ``online``, ``offline``, ``never`` or
    ``no_worker`` (``label`` says it in words, ``tone`` is the badge's)."""
    whose = possessive(name)
    if workers is None or not workers.workers:
        state, tone = "no_worker", "bad"
        text = f"Waiting on {name}, which has no worker credentials: no worker can connect for it"
    elif workers.online:
        state, tone = "online", "ok"
        tail = f", {doing} since {clock(since, now=now)}" if since else ""
        text = f"Waiting on {whose} worker (online{tail})"
    elif not workers.latest.seen:
        state, tone = "never", "bad"
        text = f"Waiting on {whose} worker, which has never connected"
    else:
        heard = workers.latest.last_seen_at
        state, tone = "offline", "bad"
        text = (
            f"Waiting on {whose} worker, offline for {duration_words(now - heard)} "
            f"(last heard {clock(heard, now=now)})"
        )
    return {
        "institution": name,
        "state": state,
        "label": _LABELS[state],
        "tone": tone,
        "text": text,
    }


_LABELS = {
    "online": "online",
    "offline": "offline",
    "never": "never connected",
    "no_worker": "no worker",
    "queued": "its turn to come",
}


def _empty() -> dict:
    return {"summary": "", "sites": [], "coordinator": None, "absent": []}


def job_waiting(
    job: TrainingJob, *, now: dt.datetime | None = None, read_afresh: bool = True
) -> dict:
    """What the job waits on now, JSON-ready: ``summary`` (the stage, one sentence),
    ``sites`` (each site waited on, :func:`waiting_on`), ``coordinator`` (``{"ok", "text"}``
    when it is not heard from, else None) and ``absent`` (the sites on a streak of missed
    rounds). Empty unless the job is approved (waiting to start) or running. The job's state
    is read afresh unless ``read_afresh`` is false (the caller read it in this request)."""
    now = now or timezone.now()
    if read_afresh:
        job = TrainingJob.objects.only("pk", "state").get(pk=job.pk)

    out = _empty()
    if job.state not in (JobState.APPROVED, JobState.RUNNING):
        return out
    out["coordinator"] = _coordinator(now)
    if job.state == JobState.APPROVED:
        out["summary"] = "Approved: the job starts at the coordinator's next pass."
        return out
    rnd = job.rounds.order_by("-index").first()
    if rnd is None:
        out["summary"] = "Starting: the initial model is being built."
    elif rnd.state == Round.State.OPEN:
        out["summary"], out["sites"] = _open_round(rnd, now)
    elif rnd.state == Round.State.AGGREGATING:
        out["summary"] = _aggregating(rnd, now)
    elif rnd.state == Round.State.CLOSED:
        out["summary"], out["sites"] = _closed_round(rnd, now)
    out["absent"] = [
        {"institution": a.institution, "missed": a.missed, "rounds": list(a.rounds), "text": a.text}
        for a in absent_sites([job.pk])[job.pk]
    ]
    return out


def _coordinator(now: dt.datetime) -> dict | None:
    status = next((s for s in service_statuses(now) if s.name == "coordinator"), None)
    if status is None or status.ok:
        return None
    if status.age_seconds is None:
        text = "No coordinator has been heard from yet: rounds do not move until one runs."
    else:
        text = (
            f"The coordinator has not been heard from for {duration_words(status.age_seconds)}: "
            "rounds do not move until it is back."
        )
    return {"ok": False, "text": text}


def _open_round(rnd: Round, now: dt.datetime) -> tuple[str, list[dict]]:
    updates = list(rnd.updates.select_related("institution").order_by("institution__name"))
    pending = [u for u in updates if u.status == SiteUpdate.Status.DISPATCHED]
    reported = len(updates) - len(pending)
    if now < rnd.deadline:
        when = f"it closes by {clock(rnd.deadline, now=now)} at the latest"
    else:
        when = (
            f"its deadline ({clock(rnd.deadline, now=now)}) has passed: it closes at the "
            "coordinator's next pass"
        )
    summary = (
        f"Round {rnd.index} is collecting updates: {reported} of {len(updates)} site"
        f"{'s' if len(updates) != 1 else ''} reported; {when}."
    )
    workers = site_workers({u.institution_id for u in pending}, now=now)
    sites = []
    for u in pending:
        name = u.institution.name
        if u.sent_at is None:  # cyclic: its turn has not come
            sites.append(
                {
                    "institution": name,
                    "state": "queued",
                    "label": _LABELS["queued"],
                    "tone": "",
                    "text": f"{name} trains after the sites before it in this round",
                }
            )
            continue
        sites.append(
            waiting_on(name, workers[u.institution_id], doing="training", since=u.sent_at, now=now)
        )
    return summary, sites


def _aggregating(rnd: Round, now: dt.datetime) -> str:
    since = rnd.closed_at or rnd.opened_at
    lease = rnd.lease_expires_at
    if lease is not None and lease < now:
        return (
            f"Round {rnd.index} is being aggregated, but the coordinator that took it up at "
            f"{clock(since, now=now)} stopped renewing its claim "
            f"{duration_words(now - lease)} ago: the next coordinator pass takes it up again."
        )
    return f"Round {rnd.index} is being aggregated (since {clock(since, now=now)})."


def _closed_round(rnd: Round, now: dt.datetime) -> tuple[str, list[dict]]:
    evaluation = RoundEvaluation.objects.filter(round=rnd).first()
    if evaluation is None or evaluation.state != RoundEvaluation.State.COLLECTING:
        return f"Round {rnd.index} closed; the next round opens at the coordinator's next pass.", []
    asked = list(
        evaluation.site_evaluations.filter(status=SiteEvaluation.Status.ASKED)
        .select_related("institution")
        .order_by("institution__name")
    )
    total = evaluation.site_evaluations.count()
    summary = (
        f"Round {rnd.index} closed and is being evaluated at the sites: {total - len(asked)} of "
        f"{total} reported; it is scored by {clock(evaluation.deadline, now=now)} at the latest."
    )
    workers = site_workers({e.institution_id for e in asked}, now=now)
    return summary, [
        waiting_on(
            e.institution.name,
            workers[e.institution_id],
            doing="evaluating",
            since=e.sent_at,
            now=now,
        )
        for e in asked
    ]
