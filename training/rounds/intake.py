"""Receiving a site's update: the intake of the site API's upload (docs/architecture.md, section 4,
step 3).

:func:`update_receive` takes an update only if it can count: the credential is live, the site
takes part, the round is open and asked this site for an update (and has sent it the round: a
cyclic site waits its turn), and every check of :func:`training.rounds.verification.verify_upload`
passes (size, digest, signature, the tensors against the model the site was sent in the wire
format of ``training.fl.update``, finite values, samples, metadata). A refused update is
recorded on its ``SiteUpdate`` (status rejected, with the reason) and in the ledger, and never
counts; a closed round, an unknown job or round, or an update already received are only
refused (:class:`UpdateRefused` says which, and the HTTP status to answer). The same update
(same digest) as the site's accepted one is answered as a duplicate, whatever the round's state
since: a worker that retries an upload whose answer it lost after the round closed is told
its update counted, not that the round is closed. The upload
(accepted, or rejected and recorded) that leaves no site of a FedAvg round expected asks the
coordinator to close the round (``training.round_maybe_close``); in a cyclic round every upload
does, so the next site is sent.

A replay (``training.rounds.verification`` says what is one: an update signed for another job
or round of this site, or a byte-identical copy of an update already received) is refused
with 409 ``replayed_update`` and recorded nowhere: not on the site's ``SiteUpdate`` for the
round, whose genuine upload is still taken, and not in the ledger, whose entries are acts of
the site or of the consortium (a replay is neither: it is not this site's update for this
round, and one recorded against the site's row would cost an honest site its round). It is
logged as a warning, with the site, the credential and the round, for the operators. A copy
is looked for at the first look only (one subquery, no query of its own): a replay of this
site's update racing the original's own upload is still refused on its signature, which verifies
for the original's round and not this one.

The expensive checks (hashing, the signature, unpacking tensors) run before any lock is taken;
then, in one transaction, the ledger chain is locked first and the rows after it (the project's
lock order), the state is checked again, and the outcome and its ledger entry are written
together.

Why one module: it is the one place where an upload becomes an outcome, and its correctness is
in the order of its steps (the unlocked look, the checks, the chain lock, the locked look, the
participation read again with it, the record); split, the lock order would have to be read across
files. The reads those steps run on every upload are declared beside them, compiled once per
connection (``consortium.core.prepared``), so that a change to a look and to its query is one
change. The checks themselves live in ``training.rounds.verification``.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, OuterRef, Q, Subquery
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from audit.models import LedgerHead
from consortium.core.errors import ServiceError
from consortium.core.prepared import PreparedQuery
from training import outbox, queues
from training.models import JobParticipant, Round, SiteCredential, SiteUpdate, TrainingJob
from training.rounds.artifacts import ArtifactError, artifact_store, is_digest
from training.rounds.credentials import site_actor_repr
from training.rounds.lookups import one_or_none
from training.rounds.verification import (
    Rejected,
    Rejection,
    Replayed,
    StartModelUnavailable,
    VerifiedUpdate,
    verify_upload,
)

__all__ = ["UpdateRefused", "update_receive", "update_refuse_oversize"]

logger = logging.getLogger(__name__)


class UpdateRefused(ServiceError):
    """An upload that was not taken. ``status`` is the HTTP status the API
    answers; ``recorded`` says whether the refusal was written on the site's
    ``SiteUpdate`` (rejected, with the reason) and in the ledger."""

    code = "update_refused"
    status = 400
    recorded = False

    def __init__(self, message: str, *, code: str, status: int, recorded: bool = False):
        super().__init__(message, code=code)
        self.status = status
        self.recorded = recorded


def _refused(rejection: Rejection, *, recorded: bool) -> UpdateRefused:
    return UpdateRefused(
        rejection.reason, code=rejection.code, status=rejection.status, recorded=recorded
    )


def _status_refusal(update: SiteUpdate | None, *, site: str, round_index: int, digest: str):
    """None when the update may still be received; the duplicate itself when it
    was already accepted with this digest; a refusal otherwise."""
    if update is None:
        return UpdateRefused(
            f"No update was asked of {site} in round {round_index}.",
            code="not_dispatched",
            status=409,
        )
    if update.status == SiteUpdate.Status.DISPATCHED:
        if update.sent_at is None or not update.start_digest:
            return UpdateRefused(
                f"Round {round_index} has not been sent to {site} yet (a cyclic round "
                "reaches one site at a time): there is no model to update yet.",
                code="not_sent",
                status=409,
            )
        return None
    if update.status == SiteUpdate.Status.ACCEPTED and update.update_digest == digest:
        return update
    if update.status == SiteUpdate.Status.REJECTED:
        text = f"was rejected ({update.reject_reason})"
    elif update.status == SiteUpdate.Status.ACCEPTED:
        text = f"was already accepted with another digest ({update.update_digest[:12]}…)"
    else:
        text = f"is {update.get_status_display().lower()}"
    return UpdateRefused(
        f"The update of {site} for round {round_index} {text}: it takes no other upload.",
        code="already_received",
        status=409,
    )


def _check_round(rnd: Round | None, job: TrainingJob, round_index: int) -> None:
    """A refusal that is not recorded when the round does not exist or is not open."""
    if rnd is None:
        raise UpdateRefused(
            f"Job #{job.pk} has no round {round_index}.", code="no_such_round", status=404
        )
    if rnd.state != Round.State.OPEN:
        raise UpdateRefused(
            f"round closed: round {round_index} of job #{job.pk} is "
            f"{rnd.get_state_display().lower()} and takes no updates.",
            code="round_closed",
            status=409,
        )


def _is_duplicate(update: SiteUpdate | None, digest: str) -> bool:
    return (
        update is not None
        and update.status == SiteUpdate.Status.ACCEPTED
        and bool(digest)
        and update.update_digest == digest
    )


def _copies_of(digest: str, institution_id: int):
    """The update rows that make an upload of ``digest`` a copy (see
    ``training.rounds.verification``): this site's, whatever their status, and any site's
    accepted one. (Another site's rejected row may hold a digest that was only declared.)"""
    return SiteUpdate.objects.filter(update_digest=digest).filter(
        Q(institution_id=institution_id) | Q(status=SiteUpdate.Status.ACCEPTED)
    )


# The upload's reads, compiled once per connection (consortium.core.prepared): an upload runs
# them on every request, and building and compiling them cost more than running them.
_PARTICIPANT_WITH_JOB = PreparedQuery(
    # The agreement version too: the privacy floor's check reads its maximum share.
    lambda job_id, institution_id: JobParticipant.objects.select_related(
        "job__consortium", "job__agreement_version"
    ).filter(job_id=job_id, institution_id=institution_id),
    one=True,
    job_id=int,
    institution_id=int,
)


def _site_row(job_id: int, round_index: int, institution_id: int):
    return SiteUpdate.objects.select_related("round__global_model_in").filter(
        round__job_id=job_id, round__index=round_index, institution_id=institution_id
    )


_SITE_ROW = PreparedQuery(_site_row, one=True, job_id=int, round_index=int, institution_id=int)
_SITE_ROW_WITH_COPY = PreparedQuery(
    lambda job_id, round_index, institution_id, digest: _site_row(
        job_id, round_index, institution_id
    ).annotate(
        copy_of=Subquery(
            _copies_of(digest, institution_id)
            .exclude(pk=OuterRef("pk"))
            .order_by("pk")
            .values("pk")[:1]
        )
    ),
    one=True,
    job_id=int,
    round_index=int,
    institution_id=int,
    digest=str,
)


def _participant_of(job_id: int, institution_id: int):
    return JobParticipant.objects.filter(job_id=job_id, institution_id=institution_id)


_LOCKED_ROUND = PreparedQuery(
    lambda job_id, round_index: (
        Round.objects.select_for_update(of=("self",))
        .select_related("global_model_in")
        .filter(job_id=job_id, index=round_index)
    ),
    one=True,
    job_id=int,
    round_index=int,
)
_LOCKED_SITE_ROW = PreparedQuery(
    # ``others_expected``: whether another site's update is still awaited in this round, which
    # decides whether this upload asks the round to close (``_ask_to_close``). Read here, after
    # the chain lock and the round's row are taken, it is what a read after the outcome would
    # find: uploads and removals take the chain lock, and the coordinator's close and failure
    # (which turn the awaited rows into stragglers) update the round's row first.
    # The participation now (``_participation_now``): the site's participant row in the job and
    # whether the uploading credential is still live, in the same statement, so that the chain's
    # lock, which every upload waits for, is held for one round trip fewer. Revocation and
    # removal take the chain lock, so this statement, which starts once it is held, sees them.
    lambda round_id, institution_id, job_id, credential_id: (
        SiteUpdate.objects.select_for_update(of=("self",))
        .filter(round_id=round_id, institution_id=institution_id)
        .annotate(
            others_expected=Exists(
                SiteUpdate.objects.filter(
                    round_id=OuterRef("round_id"), status=SiteUpdate.Status.DISPATCHED
                ).exclude(pk=OuterRef("pk"))
            ),
            participant_status=Subquery(
                _participant_of(job_id, institution_id).values("status")[:1]
            ),
            participant_removed_reason=Subquery(
                _participant_of(job_id, institution_id).values("removed_reason")[:1]
            ),
            credential_live=Exists(
                SiteCredential.objects.filter(pk=credential_id, revoked_at__isnull=True)
            ),
        )
    ),
    one=True,
    round_id=int,
    institution_id=int,
    job_id=int,
    credential_id=int,
)


def _first_look(credential: SiteCredential, job_id: int, round_index: int, digest: str = ""):
    """Unlocked: the job (through the site's participant row, which the participation check
    reads too), the round and the site's ``SiteUpdate`` row, in two queries; or a refusal that
    is not recorded (no such job or round for this site, the round not open). The row carries
    ``copy_of``: another update row with the same digest, if any (a subquery of the same
    query, so a replay costs the upload no query of its own)."""
    institution_id = credential.institution_id
    participant = _PARTICIPANT_WITH_JOB.one_or_none(job_id=job_id, institution_id=institution_id)
    if participant is None:
        raise UpdateRefused("Not found.", code="not_found", status=404)
    job = participant.job
    where = {"job_id": job.pk, "round_index": round_index, "institution_id": institution_id}
    if is_digest(digest):
        update = _SITE_ROW_WITH_COPY.one_or_none(**where, digest=digest)
    else:
        update = _SITE_ROW.one_or_none(**where)
    if update is not None:
        rnd = update.round
    else:
        rnd = one_or_none(
            Round.objects.select_related("global_model_in").filter(job=job, index=round_index)
        )
    if not _is_duplicate(update, digest):
        _check_round(rnd, job, round_index)
    return job, rnd, update, participant


def _locked_look(credential: SiteCredential, job: TrainingJob, round_index: int, digest: str = ""):
    """Under the chain lock: the round and the site's ``SiteUpdate`` row read again and locked,
    the round first (the coordinator's claim of a round updates the round, then its rows), since
    either may have moved since the first look. The job's spec and consortium do not move. A
    duplicate of the accepted update passes whatever the round's state (the caller answers it)."""
    rnd = _LOCKED_ROUND.one_or_none(job_id=job.pk, round_index=round_index)
    if rnd is None:
        _check_round(rnd, job, round_index)
    update = _LOCKED_SITE_ROW.one_or_none(
        round_id=rnd.pk,
        institution_id=credential.institution_id,
        job_id=job.pk,
        credential_id=credential.pk,
    )
    if not _is_duplicate(update, digest):
        _check_round(rnd, job, round_index)
    return rnd, update


def _participation_rejection(
    credential: SiteCredential,
    job: TrainingJob,
    *,
    live: bool,
    participant: JobParticipant | None,
) -> Rejection | None:
    """Rejections that come from who uploads, not from what: a credential no longer live, a
    site no longer taking part."""
    if not live:
        return Rejection(
            "credential_revoked",
            f"the credential '{credential.label}' ({credential.token_prefix}…) is revoked",
            401,
        )
    if participant is None or participant.status != JobParticipant.Status.ACTIVE:
        why = (
            f" ({participant.removed_reason})" if participant and participant.removed_reason else ""
        )
        return Rejection(
            "not_participant",
            f"{credential.institution.slug} no longer takes part in job #{job.pk}{why}",
            403,
        )
    return None


def _participation_now(
    credential: SiteCredential, job: TrainingJob, update: SiteUpdate
) -> Rejection | None:
    """The participation check on fresh rows: read under the locks with the site's row
    (``_LOCKED_SITE_ROW``), since the credential may have been revoked, or the site removed from
    the job, since the request was authenticated (revocation and removal take the chain lock,
    so what was read holds until the outcome commits)."""
    participant = None
    if update.participant_status is not None:
        participant = JobParticipant(
            job=job,
            institution_id=credential.institution_id,
            status=update.participant_status,
            removed_reason=update.participant_removed_reason,
        )
    return _participation_rejection(
        credential, job, live=update.credential_live, participant=participant
    )


def _ledger_common(update: SiteUpdate, job: TrainingJob, rnd: Round, credential) -> dict:
    return {
        "job_id": job.pk,
        "round": rnd.index,
        "site": credential.institution.slug,
        "credential": credential.token_prefix,
        "global_model": rnd.global_model_in.digest,
        "start_model": update.start_digest,
    }


def _record_rejection(
    update: SiteUpdate,
    *,
    head: LedgerHead,
    job: TrainingJob,
    rnd: Round,
    credential: SiteCredential,
    rejection: Rejection,
    update_digest: str,
    size: int,
) -> None:
    update.status = SiteUpdate.Status.REJECTED
    update.reject_reason = rejection.reason
    update.received_at = timezone.now()
    update.credential = credential
    update.update_digest = update_digest if is_digest(update_digest) else ""
    update.size_bytes = size
    update.save(
        update_fields=[
            "status",
            "reject_reason",
            "received_at",
            "credential",
            "update_digest",
            "size_bytes",
        ]
    )
    append_entry(
        locked_head=head,
        event=ledger_events.UPDATE_REJECTED,
        actor_repr=site_actor_repr(credential),
        subject=update,
        consortium_slug=job.consortium.slug,
        institution_slug=credential.institution.slug,
        payload={
            **_ledger_common(update, job, rnd, credential),
            "code": rejection.code,
            "reason": rejection.reason,
            "update_digest": update.update_digest,
            "size_bytes": size,
        },
    )
    _ask_to_close(job, rnd, update)


def _record_acceptance(
    update: SiteUpdate,
    *,
    head: LedgerHead,
    job: TrainingJob,
    rnd: Round,
    credential: SiteCredential,
    verified: VerifiedUpdate,
    update_digest: str,
    signature: str,
) -> None:
    update.status = SiteUpdate.Status.ACCEPTED
    update.received_at = timezone.now()
    update.samples = verified.samples
    update.update_digest = update_digest
    update.signature = signature
    update.size_bytes = verified.size_bytes
    update.pipeline = verified.pipeline
    update.privacy_events = verified.privacy_events
    update.metrics = verified.metrics
    update.credential = credential
    update.reject_reason = ""
    update.save()
    append_entry(
        locked_head=head,
        event=ledger_events.UPDATE_ACCEPTED,
        actor_repr=site_actor_repr(credential),
        subject=update,
        consortium_slug=job.consortium.slug,
        institution_slug=credential.institution.slug,
        payload={
            **_ledger_common(update, job, rnd, credential),
            "samples": verified.samples,
            "update_digest": update_digest,
            "signature": signature,
            "size_bytes": verified.size_bytes,
            "pipeline": verified.pipeline,
            "privacy_events": verified.privacy_events,
            "metrics": verified.metrics,
        },
    )
    _ask_to_close(job, rnd, update)


def _ask_to_close(job: TrainingJob, rnd: Round, update: SiteUpdate) -> None:
    """Ask the coordinator, through the outbox (so a broker outage never turns an accepted
    upload into an error, nor drops the request), to close the round when the update
    just recorded (accepted or rejected) may let it move: in a FedAvg round, when no site is
    still expected (the round then closes on its last upload, not on the next periodic tick);
    in a cyclic round, always (the next site is sent once this one has reported).

    Called under the chain lock, which every upload takes, so exactly one upload of a FedAvg
    round sees no site left; a lost message costs one tick of ``rounds_tick``. Whether another
    site is still expected was read with the site's row, under that lock (``_LOCKED_SITE_ROW``).
    """
    if job.spec.get("topology") != "cyclic" and update.others_expected:
        return
    outbox.send_after_commit(queues.ROUND_MAYBE_CLOSE, args=[rnd.pk])


def update_receive(
    *,
    credential: SiteCredential,
    job_id: int,
    round_index: int,
    data: bytes,
    samples: int,
    update_digest: str,
    signature: str,
    metrics: dict,
    privacy_events: list,
    pipeline: list,
) -> SiteUpdate:
    """Receive, verify and record one site's update for one round.

    Returns the accepted ``SiteUpdate``; ``update.duplicate`` is True when the
    same update (same digest) had already been accepted: a repeated upload does
    no harm and changes nothing. Raises :class:`UpdateRefused` otherwise, with
    the HTTP status to answer and whether the refusal was recorded (a failed
    check on an update the round asked for is; a closed round, an unknown job or
    round, an update already received, or a replay (409 ``replayed_update``) are
    only refused). The duplicate is answered even after the round closed.
    """
    site = credential.institution.slug
    digest = update_digest if isinstance(update_digest, str) else ""

    # Unlocked first look: a duplicate or a refused state costs no verification. The
    # credential is as authenticated; everything is read again under the locks below.
    job, rnd, update, participant = _first_look(credential, job_id, round_index, digest)
    state = _status_refusal(update, site=site, round_index=round_index, digest=digest)
    if isinstance(state, SiteUpdate):
        state.duplicate = True
        return state
    if state is not None:
        raise state

    rejection = _participation_rejection(
        credential, job, live=credential.revoked_at is None, participant=participant
    )
    verified = None
    if rejection is None:
        try:
            verified = verify_upload(
                credential=credential,
                job=job,
                rnd=rnd,
                start_digest=update.start_digest,
                data=data,
                samples=samples,
                update_digest=digest,
                signature=signature if isinstance(signature, str) else "",
                metrics=metrics,
                privacy_events=privacy_events,
                pipeline=pipeline,
                copy_of_pk=getattr(update, "copy_of", None),
            )
        except Rejected as exc:
            rejection = exc.rejection
        except Replayed as exc:
            logger.warning(
                "Replayed update refused, not recorded: site %s, credential %s…, job #%s "
                "round %s, digest %s: %s",
                site,
                credential.token_prefix,
                job.pk,
                round_index,
                digest[:12],
                exc,
            )
            raise UpdateRefused(str(exc), code="replayed_update", status=409) from None
        except StartModelUnavailable as exc:
            # The central side's own fault, nothing the site did: refused, not recorded,
            # so the site can upload again once the store is repaired.
            raise UpdateRefused(
                f"The model this site was sent cannot be read here ({exc}); try again later.",
                code="global_model_unavailable",
                status=503,
            ) from None
    if verified is not None:
        try:
            # Content-addressed and idempotent: stored before the transaction so the
            # chain lock is not held while a large file is written.
            artifact_store().put(data)
        except (ArtifactError, OSError) as exc:
            raise UpdateRefused(
                f"The update could not be stored; try again ({exc}).",
                code="storage_failed",
                status=503,
            ) from None

    with transaction.atomic():
        head = lock_chain()  # the outcome's entry is chained on it
        rnd, update = _locked_look(credential, job, round_index, digest)
        state = _status_refusal(update, site=site, round_index=round_index, digest=digest)
        if isinstance(state, SiteUpdate):
            state.duplicate = True
            return state
        if state is not None:
            raise state
        rejection = _participation_now(credential, job, update) or rejection
        if rejection is not None:
            _record_rejection(
                update,
                head=head,
                job=job,
                rnd=rnd,
                credential=credential,
                rejection=rejection,
                update_digest=digest,
                size=len(data),
            )
        else:
            _record_acceptance(
                update,
                head=head,
                job=job,
                rnd=rnd,
                credential=credential,
                verified=verified,
                update_digest=digest,
                signature=signature,
            )
    if rejection is not None:
        raise _refused(rejection, recorded=True)
    update.duplicate = False
    return update


def update_refuse_oversize(
    *, credential: SiteCredential, job_id: int, round_index: int, size: int
) -> None:
    """Record an upload refused while it was read, for being over the size limit
    (the API stops reading it). Raises :class:`UpdateRefused` (413) always."""
    limit = settings.FL_MAX_UPDATE_BYTES
    rejection = Rejection(
        "too_large", f"the update is over the limit of {limit} bytes ({size} or more)", 413
    )
    site = credential.institution.slug
    with transaction.atomic():
        head = lock_chain()  # the outcome's entry is chained on it
        job, _rnd, _update, _participant = _first_look(credential, job_id, round_index)
        rnd, update = _locked_look(credential, job, round_index)
        state = _status_refusal(update, site=site, round_index=round_index, digest="")
        if isinstance(state, SiteUpdate):  # pragma: no cover - digest "" never matches
            raise _refused(rejection, recorded=False)
        if state is not None:
            raise state
        rejection = _participation_now(credential, job, update) or rejection
        _record_rejection(
            update,
            head=head,
            job=job,
            rnd=rnd,
            credential=credential,
            rejection=rejection,
            update_digest="",
            size=size,
        )
    raise _refused(rejection, recorded=True)
