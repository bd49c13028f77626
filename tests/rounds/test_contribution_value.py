"""The spec's ``aggregation`` and ``contribution.value`` in the running platform (issue 15): a
FedAvg job that averages zero-filled makes its round models that way, coalitions valued by
minus the validation loss are recorded as ``neg_loss``, and the auditors' report recomputes
them, whether the centre or the sites measured them. Jobs run through the real coordinator and
site-worker code (the in-memory broker of tests/support/coordinator_harness.py)."""

from __future__ import annotations

import io

import pytest
import torch
from django.core.management import call_command

from audit.ledger import events as ledger_events
from tests.support.coordinator_harness import job_payloads, propose_and_start
from tests.support.fl_harness import DATASET_KEY, make_consortium3, use_artifact_folder
from training.fl.aggregate import apply_update, fedavg
from training.fl.contribution import scores_from_coalitions
from training.models import GlobalModel, JobState
from training.rounds.aggregation import accepted_updates
from training.rounds.states import load_state, load_update


@pytest.fixture
def dataset_key():
    """The bundled set (a consortium validation set: evaluated centrally) unless a test
    parametrizes it."""
    return DATASET_KEY


@pytest.fixture
def c3(cast, tmp_path, settings, dataset_key):
    use_artifact_folder(settings, tmp_path / "artifacts")
    return make_consortium3(cast, tmp_path, dataset_key=dataset_key)


SHARE_40 = [{"filter": "partial_sharing", "fraction": 0.4, "strategy": "random"}]


def _run(c3, broker, **spec):
    job = propose_and_start(c3, broker, **spec)
    broker.deliver()
    job.refresh_from_db()
    assert job.state == JobState.COMPLETED, job.end_reason
    return job


def _verify(tmp_path, job) -> str:
    path = tmp_path / "report.json"
    call_command(
        "export_contributions",
        "--job",
        str(job.pk),
        "--format",
        "json",
        "--output",
        str(path),
        stderr=io.StringIO(),
    )
    out = io.StringIO()
    call_command("verify_report", str(path), stdout=out)  # raises when a figure fails
    return out.getvalue()


def test_a_zero_filled_job_valued_by_the_loss_is_scored_and_verifies(c3, broker, tmp_path):
    job = _run(
        c3,
        broker,
        rounds=1,
        privacy_pipeline=SHARE_40,
        aggregation="zero_filled_mean",
        contribution={"method": "shapley_exact", "value": "loss"},
    )
    rnd = job.rounds.get(index=1)
    updates = accepted_updates(rnd)
    parts = []
    for update in updates:
        delta, mask = load_update(update.update_digest)
        parts.append((delta, mask or None, update.samples))
    base = load_state(rnd.global_model_in.digest)
    floating = {n: t for n, t in base.items() if t.is_floating_point()}
    made = load_state(GlobalModel.objects.get(job=job, round_index=1).digest)
    zero = apply_update(base, fedavg(parts, template=floating, zero_filled=True))
    masked = apply_update(base, fedavg(parts, template=floating))
    assert all(torch.equal(made[k], zero[k]) for k in made)
    assert not all(torch.equal(made[k], masked[k]) for k in made)

    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["metric"] == "neg_loss"
    values = {frozenset(r["sites"]): r["value"] for r in entry["coalitions"]}
    assert all(v < 0 for v in values.values())  # minus a cross-entropy
    assert values[frozenset(entry["sites"])] > values[frozenset()]  # the round lowered it
    again = scores_from_coalitions(entry["method"], entry["params"], entry["coalitions"])
    assert again == entry["scores"]
    assert "every figure matches the ledger" in _verify(tmp_path, job)


@pytest.mark.parametrize("dataset_key", ["own-records"])
def test_loss_values_measured_at_the_sites_recompute_from_their_reports(c3, broker, tmp_path):
    # The sites hold their records under a key the centre has no copy of (dataset_key): the
    # models are evaluated there, and each site reports neg_loss beside its metric.
    job = _run(c3, broker, rounds=1, contribution={"method": "auto", "value": "loss"})
    (entry,) = job_payloads(ledger_events.CONTRIBUTION_SCORED, job)
    assert entry["evaluated_at"] == "sites"
    assert entry["metric"] == "neg_loss"
    assert all(r["value"] < 0 for r in entry["coalitions"])
    text = _verify(tmp_path, job)
    assert "1 round(s) valued at the sites recompute from 3 signed evaluation report(s)" in text
