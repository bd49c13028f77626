"""A job on the hospitals' own data evaluated centrally on the validation set a data steward
uploaded (training/rounds/validation_sets.py): the coordinator's validation metric and the
contribution scores both come from that set, each naming its digest, the sites are never asked
to evaluate, and a set uploaded while the job runs does not change how the job is measured.
Jobs run through the real coordinator and site-worker code on the in-memory broker of
tests/support/coordinator_harness.py.
"""

from __future__ import annotations

import csv
import io

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from tests.support.coordinator_harness import job_payloads, propose_and_start
from tests.support.fl_harness import make_consortium3, use_artifact_folder
from training.fl.contribution import scores_from_coalitions
from training.fl.data import load_validation_set
from training.jobs.spec import evaluation_settings
from training.models import (
    CentralValidationSet,
    ContributionScore,
    GlobalModel,
    JobState,
    RoundEvaluation,
)
from training.rounds.validation_sets import validation_set_upload

OWN_KEY = "own-records"
CENTRAL = {"where": "central"}


@pytest.fixture
def c3(cast, tmp_path, settings):
    """Three hospitals holding their records under a key the centre has no copy of, under an
    agreement that allows a central validation set."""
    use_artifact_folder(settings, tmp_path / "artifacts")
    return make_consortium3(cast, tmp_path, dataset_key=OWN_KEY, allows_central_validation_set=True)


def validation_csv(limit: int | None = None) -> bytes:
    """The bundled breast-cancer validation records (disjoint from every site's), as a CSV
    like a site's own."""
    x, y = load_validation_set("breast-cancer")
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*(f"f{i}" for i in range(x.shape[1])), "label"])
    for features, label in list(zip(x.tolist(), y.tolist(), strict=True))[:limit]:
        writer.writerow([*(repr(v) for v in features), int(label)])
    return out.getvalue().encode()


def upload(cast, data: bytes) -> CentralValidationSet:
    return validation_set_upload(
        acting_user=cast.steward,
        institution=cast.hospital_a,
        key=OWN_KEY,
        file_name="holdout.csv",
        data=data,
    )


def test_a_job_evaluated_centrally_is_measured_and_scored_on_the_uploaded_set(cast, c3, broker):
    held = upload(cast, validation_csv())
    assert held.num_records == 114
    job = propose_and_start(c3, broker, rounds=2, evaluation=CENTRAL)
    assert evaluation_settings(job.spec) == CENTRAL
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason

    closed = {p["round"]: p for p in job_payloads(ledger_events.ROUND_CLOSED, job)}
    scored = {p["round"]: p for p in job_payloads(ledger_events.CONTRIBUTION_SCORED, job)}
    assert sorted(closed) == sorted(scored) == [1, 2]
    for index in (1, 2):
        metrics = GlobalModel.objects.get(job=job, round_index=index).metrics
        assert metrics["validation_set"] == held.digest
        assert metrics["validation_records"] == 114
        assert 0.0 <= metrics["validation_accuracy"] <= 1.0
        assert closed[index]["metrics"] == metrics
        entry = scored[index]
        assert entry["validation_set"] == held.digest
        assert "evaluated_at" not in entry  # valued centrally, not from site reports
        assert sorted(entry["sites"]) == sorted(s.slug for s in c3.sites)
        assert (
            scores_from_coalitions(entry["method"], entry["params"], entry["coalitions"])
            == entry["scores"]
        )
        # The coalition of every site is the round's own model, on the same records.
        everyone = next(c for c in entry["coalitions"] if len(c["sites"]) == 3)
        assert everyone["value"] == pytest.approx(metrics["validation_accuracy"], abs=1e-9)
    # The model learns on the hospitals' data, as measured on the steward's records.
    assert GlobalModel.objects.get(job=job, round_index=2).metrics["validation_accuracy"] > 0.7
    assert ContributionScore.objects.filter(job=job).count() == 6
    assert not RoundEvaluation.objects.filter(round__job=job).exists()  # no site was asked
    assert not job_payloads(ledger_events.CONTRIBUTION_UNAVAILABLE, job)
    assert verify_chain().ok


def test_a_set_uploaded_while_the_job_runs_waits_for_the_next_job(cast, c3, broker):
    first = upload(cast, validation_csv())
    job = propose_and_start(c3, broker, rounds=1, evaluation=CENTRAL)
    newer = upload(cast, validation_csv(limit=40))
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    metrics = GlobalModel.objects.get(job=job, round_index=1).metrics
    assert (metrics["validation_set"], metrics["validation_records"]) == (first.digest, 114)
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["validation_set"] == first.digest

    later = propose_and_start(c3, broker, rounds=1, evaluation=CENTRAL)
    broker.deliver()
    metrics = GlobalModel.objects.get(job=later, round_index=1).metrics
    assert (metrics["validation_set"], metrics["validation_records"]) == (newer.digest, 40)
