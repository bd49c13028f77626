"""An image-folder consortium on real site workers: three ``manage.py run_site_worker``
processes, each reading its own PNG class folders under its ``DATA_ROOT``, train and then
evaluate at the sites (the default for a data set the consortium has no copy of), against a
live central server, through the configured broker. The fixtures and the coordinator loop are
tests/rounds/test_worker_integration.py's; the PNG hospitals are
tests/rounds/test_image_folder_consortium.py's.
"""

from __future__ import annotations

import pytest

from audit.ledger import events as ledger_events
from audit.ledger.chain import verify_chain
from tests.rounds.test_image_folder_consortium import CLASSIFICATION, make_png_consortium
from tests.rounds.test_worker_integration import (  # noqa: F401 - fixtures
    DB_LOCK,
    _job_state,
    broker,
    central,
    run_coordinator,
    workers,
)
from tests.support.coordinator_harness import job_payloads
from training.models import GlobalModel, JobState, RoundEvaluation

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def c3(cast, tmp_path):
    return make_png_consortium(cast, tmp_path, CLASSIFICATION)


def test_a_png_folder_consortium_runs_and_is_evaluated_on_real_workers(c3, workers):  # noqa: F811
    for site in c3.sites:
        workers.start(site.slug)
    with DB_LOCK:
        job = c3.propose_and_approve(
            rounds=2,
            model=dict(CLASSIFICATION.model),
            purpose=CLASSIFICATION.purpose,
            local_epochs=CLASSIFICATION.local_epochs,
            optimizer={"name": "adam", "lr": CLASSIFICATION.lr},
        )
    workers.wait_ready()

    def scored():
        return len(job_payloads(ledger_events.CONTRIBUTION_JOB_SCORED, job)) == 1

    run_coordinator(scored, timeout=240, workers=workers)
    with DB_LOCK:
        assert _job_state(job) == JobState.COMPLETED, job.end_reason + workers.dump()
        slugs = sorted(site.slug for site in c3.sites)
        for index in (1, 2):
            evaluation = RoundEvaluation.objects.get(round__job=job, round__index=index)
            assert (
                sorted(
                    evaluation.site_evaluations.filter(status="reported").values_list(
                        "institution__slug", flat=True
                    )
                )
                == slugs
            )
            metrics = GlobalModel.objects.get(job=job, round_index=index).metrics
            assert 0.0 <= metrics["validation_accuracy"] <= 1.0
            assert metrics["validation_sites"] == 3
        for entry in job_payloads(ledger_events.CONTRIBUTION_SCORED, job):
            assert entry["evaluated_at"] == "sites" and sorted(entry["scores"]) == slugs
        assert verify_chain().ok
    assert "Database access" not in workers.dump() and "OperationalError" not in workers.dump()
