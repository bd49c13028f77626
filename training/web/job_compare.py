"""Two jobs side by side, as the comparison page shows them.

Everything measured comes from :func:`training.rounds.live.job_live_state`, the function the
job page draws its charts from, so a job's curve and its ε here are the ones its own page
shows; this module only lines the two jobs up (one chart, one per-round table, one privacy
table per job) and words the spec the way the job page does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from consortium.core import palette
from training.jobs.describe import describe_pipeline
from training.models import JobParticipant, JobState, TrainingJob
from training.rounds.live import job_live_state
from training.web.presenters import describe_model, percent

#: Metrics that are shares, drawn on a [0, 1] axis so two jobs' curves read at the same scale.
UNIT_METRICS = ("validation_accuracy", "validation_dice")


def metric_words(metric: str) -> str:
    """``validation_accuracy`` -> ``accuracy`` (what the page and the chart's axis call it)."""
    return metric.removeprefix("validation_").replace("_", " ") if metric else ""


@dataclass
class PrivacyRow:
    institution: str
    job: float | None  # ε this job spent at the site
    total: float | None  # ε the site spent over every job
    cap: float | None

    @property
    def share(self) -> str:
        """How much of its cap the site has spent over every job, in words ("35%")."""
        if self.total is None or not self.cap:
            return "—"
        return percent(self.total / self.cap)


@dataclass
class ComparedJob:
    """One side of the comparison."""

    job: TrainingJob
    letter: str
    model: str
    dataset_key: str
    rounds_total: int
    rounds_closed: int
    participants: list  # (name, removed?) by name
    pipeline: list  # one sentence per privacy filter, in order
    metric: str
    rounds: list = field(default_factory=list)  # rounds with a global model
    validation: list = field(default_factory=list)  # the metric per round (None: not measured)
    privacy: list = field(default_factory=list)  # PrivacyRow per participant

    @property
    def metric_words(self) -> str:
        return metric_words(self.metric)

    @property
    def label(self) -> str:
        return f"{self.letter}: #{self.job.pk} {self.job.title}"

    @property
    def final(self) -> tuple[int, float] | None:
        """(round, value) of the latest round whose model was measured, or None."""
        pairs = zip(self.rounds, self.validation, strict=True)
        measured = [(r, v) for r, v in pairs if v is not None]
        return measured[-1] if measured else None

    @property
    def final_is_last(self) -> bool:
        """Whether :attr:`final` is the job's result (a completed job), not a value so far."""
        return self.job.state == JobState.COMPLETED


def compared_job(job: TrainingJob, letter: str) -> ComparedJob:
    state = job_live_state(job)
    spec = job.spec
    series = state["series"]
    removed = JobParticipant.Status.REMOVED
    participants = [(p.institution.name, p.status == removed) for p in job.participants.all()] or [
        (slug, False) for slug in spec.get("participants") or []
    ]
    return ComparedJob(
        job=job,
        letter=letter,
        model=describe_model(spec),
        dataset_key=str(spec.get("dataset_key", "")),
        rounds_total=state["job"]["rounds_total"],
        rounds_closed=state["job"]["rounds_closed"],
        participants=participants,
        pipeline=describe_pipeline(spec),
        metric=series["metric"],
        rounds=series["rounds"],
        # Without a metric the job page sends no values at all: none per round, here.
        validation=series["validation"] or [None] * len(series["rounds"]),
        privacy=[
            PrivacyRow(institution=p["institution"], job=p["job"], total=p["spent"], cap=p["cap"])
            for p in series["privacy"]
        ],
    )


@dataclass
class JobComparison:
    sides: list  # two ComparedJob, or one while the second job is still to be chosen

    @property
    def complete(self) -> bool:
        """Whether both jobs are there (not just A, waiting for the second job)."""
        return len(self.sides) == 2

    @property
    def metric_words(self) -> str:
        metrics = sorted({s.metric for s in self.sides if s.metric})
        return " / ".join(metric_words(m) for m in metrics)

    @property
    def round_table(self) -> list[tuple[int, list]]:
        """``(round, [value or None per side])`` for every round either job measured."""
        values = [dict(zip(s.rounds, s.validation, strict=True)) for s in self.sides]
        measured = sorted({r for v in values for r, x in v.items() if x is not None})
        return [(r, [v.get(r) for v in values]) for r in measured]

    def chart(self) -> dict:
        """What the page's script draws: one line per job over the rounds (JSON-ready)."""
        unit = all(s.metric in UNIT_METRICS for s in self.sides if s.metric)
        return {
            "metric": self.metric_words,
            "unit_range": unit,
            # Colours from the one palette (consortium/core/palette.py): job A and job B keep
            # theirs whether or not the other has a measured round yet.
            "axis": palette.AXIS,
            "grid": palette.GRID,
            "traces": [
                {
                    "name": s.label + (f" ({metric_words(s.metric)})" if s.metric else ""),
                    "rounds": s.rounds,
                    "values": s.validation,
                    "colour": palette.SERIES[i % len(palette.SERIES)],
                }
                for i, s in enumerate(self.sides)
                if any(v is not None for v in s.validation)
            ],
        }


def compare_jobs(first: TrainingJob, second: TrainingJob) -> JobComparison:
    """``first`` and ``second`` side by side (A and B), each read as its own page reads it."""
    return JobComparison(sides=[compared_job(first, "A"), compared_job(second, "B")])


def compare_one(first: TrainingJob) -> JobComparison:
    """``first`` alone (A), as the page shows it while the second job is still to be chosen:
    the same facts it will show beside that job, so choosing it only adds a column."""
    return JobComparison(sides=[compared_job(first, "A")])
