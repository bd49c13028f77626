"""What a site worker may see through the site API: its jobs, the round that asks it for an
update, and the models it may download.

Reads only (the writes are the intake's, ``training.rounds.intake``). A site sees a job only
while its institution actively takes part in it; anything else is the API's 404, the same as a
missing job. :func:`site_round_start` is the one check a worker needs before it trains a
round, and says why not (:class:`NotAsked`) when the round does not ask it for an update now.
"""

from __future__ import annotations

from consortium.core.errors import ConflictError
from consortium.core.prepared import PreparedQuery
from training.models import (
    GlobalModel,
    JobParticipant,
    JobState,
    Round,
    RoundEvaluation,
    SiteCredential,
    SiteEvaluation,
    SiteUpdate,
    TrainingJob,
)
from training.rounds.artifacts import is_digest

__all__ = ["NotAsked", "site_job", "site_may_read_model", "site_round_start"]


# Run on every model download and upload: compiled once per connection
# (consortium.core.prepared), since compiling them cost more than running them.
_ACTIVE_JOB = PreparedQuery(
    lambda job_id, institution_id: TrainingJob.objects.select_related("consortium").filter(
        pk=job_id,
        participants__institution_id=institution_id,
        participants__status=JobParticipant.Status.ACTIVE,
    ),
    one=True,
    job_id=int,
    institution_id=int,
)
_ASKED_ROW = PreparedQuery(
    lambda job_id, round_index, institution_id: SiteUpdate.objects.select_related(
        "round__job"
    ).filter(
        round__job_id=job_id,
        round__index=round_index,
        institution_id=institution_id,
        # One join: the same participant row is the site's, and active.
        round__job__participants__institution_id=institution_id,
        round__job__participants__status=JobParticipant.Status.ACTIVE,
    ),
    one=True,
    job_id=int,
    round_index=int,
    institution_id=int,
)


def site_job(credential: SiteCredential, job_id: int) -> TrainingJob | None:
    """The job, if the credential's institution is an active participant of it."""
    return _ACTIVE_JOB.one_or_none(job_id=job_id, institution_id=credential.institution_id)


class NotAsked(ConflictError):
    """The round does not ask the site for an update now, so the site must not train for it:
    ``code`` says why (``job_not_running``, ``round_closed``, ``already_received``,
    ``not_dispatched``, ``not_sent``). The API answers 409 with it."""

    code = "not_asked"


def site_round_start(credential: SiteCredential, job_id: int, round_index: int) -> SiteUpdate:
    """The site's ``SiteUpdate`` of round ``round_index`` of job ``job_id`` (with its round and
    job), while that round asks the site for an update: its ``start_digest`` is the model the
    site must train from now.

    This is the one check a site worker needs each round (its job spec is immutable for its
    digest and cached on site): one query when the answer is yes. Returns None when the job is
    not one the site actively takes part in, or has no such round (the API's 404, the same as
    for a missing job); raises :class:`NotAsked` when the site must not train: the job no
    longer runs, the round is closed, the site's update was already received (a second
    delivery of the task), the round asked nothing of the site, or (cyclic) has not reached it.
    """
    update = _ASKED_ROW.one_or_none(
        job_id=job_id, round_index=round_index, institution_id=credential.institution_id
    )
    site = credential.institution.slug
    if update is None:
        if (
            site_job(credential, job_id) is None
            or not Round.objects.filter(job_id=job_id, index=round_index).exists()
        ):
            return None
        raise NotAsked(
            f"No update is asked of {site} in round {round_index}.", code="not_dispatched"
        )
    rnd, job = update.round, update.round.job
    if job.state != JobState.RUNNING:
        raise NotAsked(
            f"Job #{job.pk} is {job.get_state_display().lower()}: it takes no updates.",
            code="job_not_running",
        )
    if rnd.state != Round.State.OPEN:
        raise NotAsked(
            f"Round {round_index} of job #{job.pk} is {rnd.get_state_display().lower()}.",
            code="round_closed",
        )
    if update.status != SiteUpdate.Status.DISPATCHED:
        raise NotAsked(
            f"The update of {site} for round {round_index} was already received "
            f"({update.get_status_display().lower()}).",
            code="already_received",
        )
    if update.sent_at is None or not update.start_digest:
        raise NotAsked(
            f"Round {round_index} has not been sent to {site} yet (a cyclic round reaches one "
            "site at a time).",
            code="not_sent",
        )
    return update


def site_may_read_model(credential: SiteCredential, job: TrainingJob, digest: str) -> bool:
    """Whether the site may download model ``digest`` of ``job``: one of the job's global
    models, or the model the site itself was sent for one of its rounds (in a cyclic round,
    the previous site's result), or a coalition model it is asked to evaluate while it is.
    Another site's start model is not among them."""
    if not is_digest(digest):
        return False
    if GlobalModel.objects.filter(job=job, digest=digest).exists():
        return True
    if SiteUpdate.objects.filter(
        round__job=job, institution_id=credential.institution_id, start_digest=digest
    ).exists():
        return True
    # A coalition model the site is asked to evaluate now (training.rounds.site_evaluation).
    asked = RoundEvaluation.objects.filter(
        round__job=job,
        state=RoundEvaluation.State.COLLECTING,
        site_evaluations__institution_id=credential.institution_id,
        site_evaluations__status=SiteEvaluation.Status.ASKED,
    ).values_list("asked_models", flat=True)
    return any(m.get("digest") == digest for models in asked for m in models)
