"""Handing out a job's global model: read from the artifact store (which checks the bytes
against their digest, so a damaged file is never served) and recorded in the ledger as
``model.downloaded``, in the same transaction, before the bytes leave: who took which model
away is part of the consortium's accountability, like a report's export.

Who may is decided by the rule ``training.download_model`` (:mod:`training.jobs.permissions`),
checked by the view.
"""

from __future__ import annotations

from django.db import transaction

from audit.ledger import events as ledger_events
from training.jobs.transitions import record_job_event
from training.models import GlobalModel, TrainingJob
from training.rounds.artifacts import artifact_store

__all__ = ["global_model_download"]


def global_model_download(
    *, job: TrainingJob, round_index: int, acting_user
) -> tuple[GlobalModel, bytes] | None:
    """The job's global model of ``round_index`` and its bytes, the download recorded; None
    when the job has no such model. Raises :class:`training.rounds.artifacts.ArtifactError`
    when the file is missing or damaged (nothing is recorded then)."""
    model = GlobalModel.objects.filter(job=job, round_index=round_index).first()
    if model is None:
        return None
    data = artifact_store().get(model.digest)
    with transaction.atomic():
        record_job_event(
            ledger_events.MODEL_DOWNLOADED,
            actor=acting_user,
            job=job,
            round=model.round_index,
            digest=model.digest,
            size_bytes=len(data),
        )
    return model, data
