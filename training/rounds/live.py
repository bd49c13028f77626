"""What the job page shows live: progress, the current round's sites, and the chart series.

The job page renders :func:`job_live_state` once on load, into a JSON script element, and its
websocket consumer (:mod:`training.web.consumers`) sends a fresh one whenever a ledger entry
about the
job is committed; the page's script redraws the progress bars, the round's site table and the
Plotly charts from it. One function for both, so a reload and a live update show the same thing.

Everything is JSON-ready (plain numbers, strings and lists). The query count does not grow with
the number of rounds or sites (pinned by a test).
"""

from __future__ import annotations

from django.db.models import Count, Max

from training.jobs.selectors import job_accountability, undecided_participations
from training.models import GlobalModel, JobState, Round, SiteUpdate, TrainingJob

#: The share of its ε cap at which a site's spending shows as a warning.
BUDGET_WARNING_SHARE = 0.8

#: Validation metrics, in order of preference, for the chart of the global model.
_HEADLINE_METRICS = ("validation_accuracy", "validation_dice")

#: The local metric each site reports that the loss chart plots.
_LOCAL_LOSS = "train_loss_last_epoch"

_UPDATE_LABELS = dict(SiteUpdate.Status.choices)
_ROUND_LABELS = dict(Round.State.choices)


def _finite_or_none(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def _headline(models: list[GlobalModel]) -> str | None:
    for name in _HEADLINE_METRICS:
        if any(name in (m.metrics or {}) for m in models):
            return name
    return None


def _round_state(job: TrainingJob, rnd: Round | None, names: dict[int, str]) -> dict | None:
    if rnd is None:
        return None
    rows = sorted(rnd.updates.all(), key=lambda u: names.get(u.institution_id, ""))
    reported = sum(
        1 for u in rows if u.status in (SiteUpdate.Status.ACCEPTED, SiteUpdate.Status.REJECTED)
    )
    return {
        "index": rnd.index,
        "state": rnd.state,
        "state_label": _ROUND_LABELS.get(rnd.state, rnd.state),
        "deadline": rnd.deadline.isoformat(),
        "expected": len(rows),
        "reported": reported,
        "percent": round(100 * reported / len(rows)) if rows else 0,
        "failure_reason": rnd.failure_reason,
        "sites": [
            {
                "institution": names.get(u.institution_id, str(u.institution_id)),
                "status": u.status,
                "status_label": _UPDATE_LABELS.get(u.status, u.status),
                "samples": u.samples if u.status == SiteUpdate.Status.ACCEPTED else None,
                "reason": u.reject_reason,
            }
            for u in rows
        ],
    }


def job_live_state(job: TrainingJob, *, account=None, read_afresh: bool = True) -> dict:
    """The job's progress, its latest round and the chart series, as plain JSON data.

    The job is read afresh by default: a consumer holds its instance for the socket's
    lifetime. The job page passes ``read_afresh=False`` with the job it has just read in the
    same request, its participants and their institutions prefetched (three queries fewer).
    """
    if read_afresh:
        job = (
            TrainingJob.objects.select_related("agreement_version")
            .prefetch_related("participants__institution")
            .get(pk=job.pk)
        )
    spec = job.spec or {}
    total_rounds = int(spec.get("rounds") or 0)
    names = {p.institution_id: p.institution.name for p in job.participants.all()}
    closed = job.rounds.filter(state=Round.State.CLOSED).aggregate(n=Max("index"))["n"] or 0
    latest = job.rounds.order_by("-index").prefetch_related("updates").first()
    models = list(job.global_models.order_by("round_index"))
    metric = _headline(models)
    rounds_axis = [m.round_index for m in models]

    losses: dict[str, dict[int, float]] = {}
    updates = (
        SiteUpdate.objects.filter(round__job=job, status=SiteUpdate.Status.ACCEPTED)
        .values_list("institution_id", "round__index", "metrics")
        .order_by("round__index")
    )
    for institution_id, index, metrics in updates:
        value = _finite_or_none((metrics or {}).get(_LOCAL_LOSS))
        if value is not None:
            losses.setdefault(names.get(institution_id, str(institution_id)), {})[index] = value

    if account is None:  # the job page passes the one it already has
        account = job_accountability(job)
    privacy, contribution, warnings = [], [], []
    for row in account.rows:
        name = row.institution.name
        spent = _finite_or_none(row.epsilon_total)
        privacy.append(
            {
                "institution": name,
                "spent": spent,
                "job": _finite_or_none(row.epsilon_job),
                "cap": row.cap,
            }
        )
        if spent is not None and row.cap and spent >= BUDGET_WARNING_SHARE * row.cap:
            warnings.append(
                f"{name} has spent ε {spent:.2f} of its cap {row.cap:g} "
                f"({100 * spent / row.cap:.0f}%)."
            )
        contribution.append({"institution": name, "score": _finite_or_none(row.score)})

    running = job.state == JobState.RUNNING
    return {
        "job": {
            "id": job.pk,
            "state": job.state,
            "state_label": job.get_state_display(),
            "end_reason": job.end_reason,
            "rounds_total": total_rounds,
            "rounds_closed": closed,
            "percent": round(100 * closed / total_rounds) if total_rounds else 0,
            "running": running,
        },
        "round": _round_state(job, latest, names),
        "series": {
            "rounds": rounds_axis,
            "metric": metric or "",
            "validation": [_finite_or_none((m.metrics or {}).get(metric)) for m in models]
            if metric
            else [],
            "site_loss": [
                {
                    "institution": name,
                    "rounds": sorted(points),
                    "values": [points[i] for i in sorted(points)],
                }
                for name, points in sorted(losses.items())
            ],
            "privacy": privacy,
            "contribution": contribution,
        },
        "budget_warnings": warnings,
    }


#: Running jobs the consortium dashboard lists (the newest; the count says how many in all).
RUNNING_SHOWN = 10


def consortium_live_state(consortium) -> dict:
    """The consortium dashboard's live part: jobs by state, the approvals each institution still
    owes, and the newest running jobs' progress. Four queries, each an aggregate or a bounded
    list, whatever the number of jobs (pinned by a test and by benchmarks/pages.py)."""
    jobs = TrainingJob.objects.filter(consortium=consortium)
    labels = dict(JobState.choices)
    by_state = dict(jobs.order_by().values_list("state").annotate(n=Count("pk")))
    owed = (
        undecided_participations()
        .filter(job__consortium=consortium)
        .order_by()
        .values_list("institution__name")
        .annotate(n=Count("pk"))
    )
    running = list(
        jobs.filter(state=JobState.RUNNING)
        .only("pk", "title", "spec_text")
        .order_by("-pk")[:RUNNING_SHOWN]
    )
    closed = dict(
        Round.objects.filter(job__in=[j.pk for j in running], state=Round.State.CLOSED)
        .order_by()
        .values("job_id")
        .annotate(n=Max("index"))
        .values_list("job_id", "n")
    )
    return {
        "jobs_by_state": [
            {"state": state, "label": labels[state], "count": by_state[state]}
            for state in labels
            if by_state.get(state)
        ],
        "approvals_owed": [{"institution": n, "count": c} for n, c in sorted(owed)],
        "running_total": by_state.get(JobState.RUNNING, 0),
        "running": [
            {
                "id": j.pk,
                "title": j.title,
                "rounds_total": int(j.spec.get("rounds") or 0),
                "rounds_closed": closed.get(j.pk, 0),
            }
            for j in running
        ],
    }
