"""Jobs planted as rows, in any state, with rounds already run: what the jobs list's filters
and the comparison page read. Those pages read; how a job gets to its state is tested with
the services elsewhere, so the rows are written directly here (quick, and any state at once).

Each round gets a global model with a validation metric and one accepted update per
participant carrying a Gaussian privacy event, so the ε the pages show is replayed from real
events by the accountant.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json

from django.utils import timezone

from tests.support.training_fixtures import make_spec
from training.models import GlobalModel, JobParticipant, JobState, Round, SiteUpdate, TrainingJob

#: The privacy event each participant's accepted update records (ε about 1.2 per round at
#: δ 1e-5: a few rounds stay under the TERMS cap of 8).
EVENT = {
    "mechanism": "gaussian",
    "params": {"noise_multiplier": 5.0},
    "count": 1,
    "source": "gaussian_noise",
}


def plant_job(
    consortium,
    *,
    title: str,
    institutions=(),
    state: str = JobState.RUNNING,
    version=None,
    metrics=(),
    metric: str = "validation_accuracy",
    rounds: int = 5,
    **spec_overrides,
) -> TrainingJob:
    """A job of ``consortium`` in ``state`` with ``institutions`` taking part and one closed
    round per value in ``metrics`` (round i's model measured ``metrics[i - 1]``)."""
    spec = make_spec(participants=[i.slug for i in institutions], rounds=rounds, **spec_overrides)
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    job = TrainingJob.objects.create(
        consortium=consortium,
        title=title,
        spec_text=text,
        spec_digest=hashlib.sha256(text.encode()).hexdigest(),
        agreement_version=version,
        state=state,
        proposer_repr="planted",
    )
    for institution in institutions:
        JobParticipant.objects.create(job=job, institution=institution)
    now = timezone.now()
    previous = GlobalModel.objects.create(
        job=job, round_index=0, digest="0" * 64, lineage_hash="0" * 64
    )
    for index, value in enumerate(metrics, start=1):
        model = GlobalModel.objects.create(
            job=job,
            round_index=index,
            digest=f"{index:064x}",
            lineage_hash=f"{index:064x}",
            parent=previous,
            metrics={metric: value},
        )
        rnd = Round.objects.create(
            job=job,
            index=index,
            state=Round.State.CLOSED,
            global_model_in=previous,
            global_model_out=model,
            deadline=now + dt.timedelta(minutes=5),
            closed_at=now,
        )
        for institution in institutions:
            SiteUpdate.objects.create(
                round=rnd,
                institution=institution,
                status=SiteUpdate.Status.ACCEPTED,
                samples=100,
                privacy_events=[EVENT],
            )
        previous = model
    return job
