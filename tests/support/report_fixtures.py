"""A planted consortium history for the contribution-report tests.

A real agreement (published and signed), real data sets and a real job proposal (so the ledger
holds ``agreement.version_published`` and ``job.proposed`` as the services write them), then three
rounds written with ``append_entry`` in the shapes the coordinator, the site API and the scorer
write (the scorer's entries follow the contract of issue 5):

* round 1: hospital A accepted (300 samples); hospital B rejected with a reason that a spreadsheet
  would read as a formula;
* rounds 2 and 3: both accepted (A 300, B 200 samples);
* every accepted update spends one Gaussian event (noise multiplier 1.1);
* ``contribution.scored`` per round, ``contribution.job_scored`` at the end;
* then hospital B withdraws its consent (the real service): the models of rounds 2 and 3 were
  derived from its contributions, round 1's was not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from audit.ledger.chain import append_entry
from consortium.governance.services.withdrawals import consent_withdraw
from tests.support.agreements import agreement_in_force
from tests.support.training_pages import (
    AGREEMENT_TITLE,
    default_pipeline_spec,
    steward_registers_datasets,
)
from training.jobs.proposals import job_propose

FORMULA_REASON = '=HYPERLINK("http://evil.example","click")'
GAUSSIAN = {
    "mechanism": "gaussian",
    "params": {"noise_multiplier": 1.1},
    "count": 1,
    "source": "gaussian_noise",
}
ROUND_SCORES = {
    1: {"hospital-a": 0.25},
    2: {"hospital-a": 0.125, "hospital-b": -0.0625},
    3: {"hospital-a": 0.5, "hospital-b": 0.125},
}
#: The full coalition's value in every planted round; leave-one-out then records, for each site,
#: the coalition without it at FULL_VALUE - score (binary fractions: the subtraction is exact, so
#: verify_report's recomputation from the coalition values gives the scores bit for bit).
FULL_VALUE = 0.75


def loo_coalitions(scores: dict) -> list[dict]:
    sites = sorted(scores)
    rows = [{"sites": sites, "value": FULL_VALUE}]
    for site in sites:
        rows.append({"sites": [s for s in sites if s != site], "value": FULL_VALUE - scores[site]})
    return rows


SAMPLES = {"hospital-a": 300, "hospital-b": 200}


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Planted:
    cast: object
    job: object
    version: object
    models: dict  # round -> (digest, lineage)


def plant(cast, *, withdraw: bool = True) -> Planted:
    version = agreement_in_force(cast, title=AGREEMENT_TITLE)
    steward_registers_datasets(cast)
    job = job_propose(
        acting_user=cast.researcher,
        consortium=cast.consortium,
        title="Tumours",
        spec=default_pipeline_spec(cast),
    )
    slug = cast.consortium.slug
    models = {}
    lineage = digest("genesis")
    for index in (1, 2, 3):
        sites = {}
        for site in ("hospital-a", "hospital-b"):
            update = digest(f"update {index} {site}")
            common = {"job_id": job.pk, "round": index, "site": site, "update_digest": update}
            if index == 1 and site == "hospital-b":
                append_entry(
                    event="round.update_rejected",
                    actor_repr=f"site {site} worker",
                    subject=job,
                    consortium_slug=slug,
                    institution_slug=site,
                    payload={**common, "code": "not_finite", "reason": FORMULA_REASON},
                )
                continue
            append_entry(
                event="round.update_accepted",
                actor_repr=f"site {site} worker",
                subject=job,
                consortium_slug=slug,
                institution_slug=site,
                payload={
                    **common,
                    "samples": SAMPLES[site],
                    "privacy_events": [GAUSSIAN],
                    "pipeline": [],
                    "metrics": {"loss": 0.5},
                },
            )
            sites[site] = update
        model = digest(f"model {index}")
        parent_lineage, lineage = lineage, digest(f"lineage {index}")
        models[index] = (model, lineage)
        append_entry(
            event="round.closed",
            subject=job,
            consortium_slug=slug,
            payload={
                "job_id": job.pk,
                "round": index,
                "global_digest": model,
                "parent_lineage_hash": parent_lineage,
                "lineage_hash": lineage,
                "sites": sites,
            },
        )
        scores = ROUND_SCORES[index]
        append_entry(
            event="contribution.scored",
            subject=job,
            consortium_slug=slug,
            payload={
                "job_id": job.pk,
                "round": index,
                "method": "leave_one_out",
                "params": {},
                "metric": "accuracy",
                "sites": sorted(scores),
                "coalitions": loo_coalitions(scores),
                "scores": scores,
                "evaluations": len(scores) + 1,
            },
        )
    totals = {
        s: sum(ROUND_SCORES[r].get(s, 0.0) for r in ROUND_SCORES)
        for s in ("hospital-a", "hospital-b")
    }
    append_entry(
        event="contribution.job_scored",
        subject=job,
        consortium_slug=slug,
        payload={
            "job_id": job.pk,
            "method": "leave_one_out",
            "metric": "accuracy",
            "scores": totals,
            "rounds": {"hospital-a": 3, "hospital-b": 2},
        },
    )
    if withdraw:
        consent_withdraw(
            acting_user=cast.approver_b,
            agreement=version.agreement,
            institution=cast.hospital_b,
            reason="@SUM(1+1) the board revoked the data-use approval",
        )
    return Planted(cast=cast, job=job, version=version, models=models)
