"""The privacy budget check the coordinator runs before it sends a round (docs/architecture.md,
section 4).

Per round the coordinator checks every site's privacy budget before it sends anything: it
replays what the site has already spent (the privacy events of its accepted updates, across
the consortium, plus the live reservations of the other jobs it takes part in) with this
round's projected events, against the agreement's cap. A site that would go over is not sent
the round (the coordinator records it in the ledger); with fewer than ``min_participants``
left the job fails. The replay is the accountant's (``training.jobs.accounting``), the same
as at proposal.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from training.jobs.accounting import PrivacyEvent, events_for_pipeline, project_budget
from training.jobs.selectors import committed_privacy_events
from training.jobs.spec import training_records
from training.models import SiteDataset, TrainingJob

__all__ = ["BudgetCheck", "check_budgets"]


@dataclass
class BudgetCheck:
    """The outcome of :func:`check_budgets`."""

    eligible: list = field(default_factory=list)  # JobParticipant rows
    skipped: list = field(default_factory=list)  # {"site", "reason"}


def _spent_events(job: TrainingJob, institution_ids: list[int]) -> dict[int, list[PrivacyEvent]]:
    """What each institution has spent or committed, for the per-round check
    (the same replay as at proposal: ``selectors.committed_privacy_events``)."""
    return committed_privacy_events(institution_ids, exclude_job_id=job.pk)


def check_budgets(job: TrainingJob, spec: dict, participants: list) -> BudgetCheck:
    """Which of ``participants`` (``JobParticipant`` rows, with their institutions) may be
    sent the next round of ``job``: those whose projected spending, after one more round,
    stays within the agreement's cap; the others are skipped, each with the reason."""
    check = BudgetCheck()
    version = job.agreement_version
    if version is None:  # pragma: no cover - a job is bound to a version when proposed
        check.eligible = list(participants)
        return check
    cap, delta = float(version.epsilon_cap), float(version.delta)
    ids = [p.institution_id for p in participants]
    datasets = {
        d.institution_id: d
        for d in SiteDataset.objects.filter(institution_id__in=ids, key=spec["dataset_key"])
    }
    past = _spent_events(job, ids)
    for participant in participants:
        institution = participant.institution
        dataset = datasets.get(institution.pk)
        if dataset is None:
            check.skipped.append(
                {
                    "site": institution.slug,
                    "reason": f"{institution} no longer offers '{spec['dataset_key']}'",
                }
            )
            continue
        events = events_for_pipeline(
            spec["privacy_pipeline"],
            rounds=1,
            local_epochs=spec["local_epochs"],
            batch_size=spec["batch_size"],
            num_records=training_records(dataset.num_records, spec),
        )
        projection = project_budget(
            institution=institution.name,
            past_events=past.get(institution.pk, []),
            job_events=events,
            cap=cap,
            delta=delta,
        )
        if projection.fits:
            check.eligible.append(participant)
        else:
            check.skipped.append(
                {
                    "site": institution.slug,
                    "reason": "privacy budget: " + projection.explain(),
                    "projected_epsilon": round(projection.projected, 6),
                    "cap": cap,
                }
            )
    return check
