"""What every fault scenario asserts of its job once it has ended (issue 13, "Tests"):

* every accepted update counted exactly once, in its own round: each closed round has exactly
  one ``round.closed`` entry and one ``GlobalModel``, whose ``sites`` are exactly the round's
  ``ACCEPTED`` ``SiteUpdate`` rows (digest for digest), whose lineage hash recomputes from the
  parent's and those updates, and no update digest is counted in two rounds;
* every closed round scored: one ``contribution.scored`` (or ``contribution.unavailable``,
  which says why) per closed round, with a ``ContributionScore`` row per scored site, and one
  ``contribution.job_scored`` for a completed job;
* the job completed, or failed with its reason recorded (``end_reason`` and a ``job.*`` entry);
* the ledger verifies.

Plus :class:`Progress`, which tells when the job moved (a round opened or closed, an update
accepted, the job ended): the scenarios' time to recover.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

from audit.ledger.chain import verify_chain
from audit.models import LedgerEntry
from training.models import (
    ContributionScore,
    GlobalModel,
    JobState,
    Round,
    SiteUpdate,
    TrainingJob,
)
from training.rounds.coordinator import lineage_hash


def entries(event: str, subject) -> list[dict]:
    """The payloads of ``event`` entries about ``subject``, oldest first."""
    rows = LedgerEntry.objects.filter(
        event=event, subject_type=subject._meta.label_lower, subject_id=str(subject.pk)
    ).order_by("seq")
    return [json.loads(e.payload_text) for e in rows]


def assert_counted_once(job: TrainingJob) -> None:
    seen: dict[str, int] = {}
    for rnd in job.rounds.order_by("index"):
        accepted = {
            u.institution.slug: u.update_digest
            for u in rnd.updates.select_related("institution").filter(
                status=SiteUpdate.Status.ACCEPTED
            )
        }
        sites = rnd.updates.order_by().values("institution").distinct().count()
        assert sites == rnd.updates.count(), f"round {rnd.index}: a site has two update rows"
        closed = entries("round.closed", rnd)
        models = GlobalModel.objects.filter(job=job, round_index=rnd.index)
        if rnd.state != Round.State.CLOSED:
            assert closed == [], f"round {rnd.index} ({rnd.state}) has a round.closed entry"
            assert not models.exists(), f"round {rnd.index} ({rnd.state}) has a global model"
            continue
        assert len(closed) == 1, f"round {rnd.index}: {len(closed)} round.closed entries"
        assert models.count() == 1, f"round {rnd.index}: {models.count()} global models"
        payload, model = closed[0], models.get()
        assert payload["sites"] == accepted, (
            f"round {rnd.index}: the ledger counted {payload['sites']}, the rows say {accepted}"
        )
        assert rnd.global_model_out_id == model.pk
        assert model.parent_id == rnd.global_model_in_id
        pairs = [
            (u.update_digest, u.samples)
            for u in rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED)
        ]
        assert model.lineage_hash == lineage_hash(model.parent.lineage_hash, model.digest, pairs)
        assert payload["lineage_hash"] == model.lineage_hash
        for slug, digest in accepted.items():
            assert digest not in seen, (
                f"{slug}'s update {digest[:12]} counted in rounds {seen[digest]} and {rnd.index}"
            )
            seen[digest] = rnd.index


def assert_scored(job: TrainingJob) -> None:
    for rnd in job.rounds.filter(state=Round.State.CLOSED).order_by("index"):
        scored = entries("contribution.scored", rnd)
        unavailable = entries("contribution.unavailable", rnd)
        assert len(scored) + len(unavailable) == 1, (
            f"round {rnd.index}: {len(scored)} contribution.scored and {len(unavailable)} "
            "contribution.unavailable entries (exactly one expected)"
        )
        if scored:
            rows = ContributionScore.objects.filter(round=rnd).count()
            assert rows == len(scored[0]["scores"]), (
                f"round {rnd.index}: {rows} score rows for {len(scored[0]['scores'])} scores"
            )
    if job.state == JobState.COMPLETED:
        totals = entries("contribution.job_scored", job)
        assert len(totals) == 1, f"{len(totals)} contribution.job_scored entries"


def scored(job: TrainingJob) -> bool:
    """Whether :func:`assert_scored` holds now."""
    try:
        assert_scored(job)
    except AssertionError:
        return False
    return True


def round_scored(rnd: Round) -> bool:
    return bool(entries("contribution.scored", rnd) or entries("contribution.unavailable", rnd))


def assert_ended(job: TrainingJob, *, expect: str = JobState.COMPLETED) -> None:
    job.refresh_from_db()
    assert job.state == expect, f"job is {job.state} ({job.end_reason!r}), {expect} expected"
    if job.state == JobState.FAILED:
        assert job.end_reason, "the job failed without a recorded reason"


def assert_ledger_verifies() -> None:
    result = verify_chain()
    assert result.ok, result.summary()


def assert_job_sound(job: TrainingJob, *, expect: str = JobState.COMPLETED) -> None:
    """Everything a scenario asserts of its ended job (module docstring)."""
    assert_ended(job, expect=expect)
    assert_counted_once(job)
    assert_scored(job)
    assert_ledger_verifies()


# --- Progress ---------------------------------------------------------------------------------


def progress_mark(job: TrainingJob, *, updates: bool = True) -> tuple:
    """What changes whenever the job moves on: its state, its rounds' states and (unless
    ``updates`` is False: the coordinator's own progress only) its accepted updates."""
    job.refresh_from_db()
    rounds = list(job.rounds.values_list("index", "state"))
    accepted = (
        SiteUpdate.objects.filter(round__job=job, status=SiteUpdate.Status.ACCEPTED).count()
        if updates
        else 0
    )
    return (job.state, tuple(sorted(rounds)), accepted)


@dataclass
class Progress:
    """When did ``job`` move on after a fault? :meth:`mark` at the fault (or its repair),
    :meth:`wait` until it moved: the seconds from the mark."""

    job: TrainingJob
    updates: bool = True
    at: float = 0.0
    mark_value: tuple = ()

    def mark(self) -> None:
        self.at = time.monotonic()
        self.mark_value = progress_mark(self.job, updates=self.updates)

    def moved(self) -> bool:
        return progress_mark(self.job, updates=self.updates) != self.mark_value

    def wait(self, *, timeout: float, cluster=None) -> float:
        from tests.support.fault_cluster import wait_until

        wait_until("the job to move on", self.moved, timeout=timeout, every=0.1, cluster=cluster)
        return time.monotonic() - self.at


def job_for(pk: int) -> TrainingJob:
    return TrainingJob.objects.get(pk=pk)
