"""Writes for the site workers: their credentials, and receiving their updates.

A site worker holds no central database credentials (DESIGN section 2). It is
known here by a :class:`~training.models.SiteCredential`: an API token (only its
SHA-256 is stored; the token is shown once, when created) and the worker's
Ed25519 public key. Through the REST API (``training.rounds.site_api``), authenticated
as its site, it fetches the model it was sent and uploads its signed update.

:func:`update_receive` verifies an update before it can count: the credential
is live, the site takes part, the round is open and asked this site for an
update (and has sent it the round: a cyclic site waits its turn), the size is
within ``settings.FL_MAX_UPDATE_BYTES``, the bytes hash to the declared digest,
the site's Ed25519 signature holds over
``training.fl.signing.update_message(...)``, the file is a valid tensor
container whose ``delta/<name>`` (float32) and ``mask/<name>`` (bool) tensors
match the model the site was sent (``SiteUpdate.start_digest``, from which the
update is a delta), every value is finite, the sample count is
plausible for the site's data set, and the privacy events are valid. A refused
update is recorded on its ``SiteUpdate`` (status rejected, with the reason) and
in the ledger, and never counts. The upload (accepted, or rejected and recorded)
that leaves no site of a FedAvg round expected asks the coordinator to close the
round (``training.round_maybe_close``); in a cyclic round every upload does, so
the next site is sent.

The expensive checks (hashing, the signature, unpacking tensors) run before any
lock is taken; then, in one transaction, the ledger chain is locked first and
the rows after it (the project's lock order), the state is checked again, and
the outcome and its ledger entry are written together.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import Exists, Q
from django.utils import timezone

from audit.ledger import events as ledger_events
from audit.ledger.chain import append_entry, lock_chain
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Institution
from consortium.governance.services import key_fingerprint, validate_worker_public_key
from training import queues
from training.jobs.accounting import PrivacyEvent
from training.models import (
    GlobalModel,
    JobParticipant,
    JobState,
    Round,
    SiteCredential,
    SiteDataset,
    SiteUpdate,
    TrainingJob,
)
from training.rounds.artifacts import ArtifactError, artifact_store, is_digest, sha256_hex

TOKEN_PREFIX = "fls_"
#: How many of the token's first characters are kept, to tell credentials apart.
TOKEN_PREFIX_LENGTH = 12
#: last_used_at is written at most this often per credential.
LAST_USED_RESOLUTION = dt.timedelta(minutes=1)
#: The task the coordinator runs when an update is accepted (queued by name:
#: the coordinator implements it).
#: Largest metrics / pipeline / privacy-events JSON kept per update.
MAX_METADATA_CHARS = 16_384


# --- Errors -------------------------------------------------------------------------------


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


@dataclass
class _Rejection:
    """A failed check, before it is recorded."""

    code: str
    reason: str
    status: int = 400

    def refused(self, *, recorded: bool) -> UpdateRefused:
        return UpdateRefused(self.reason, code=self.code, status=self.status, recorded=recorded)


class _Reject(Exception):
    def __init__(self, code: str, reason: str, status: int = 400):
        super().__init__(reason)
        self.rejection = _Rejection(code=code, reason=reason, status=status)


def _one(queryset):
    """The row of a query on a unique key, or None. ``get()`` leaves ordering out of the SQL
    (``first()`` orders by the primary key or the model's ordering, which costs a join or a
    sort and compiling them): the site API runs these lookups on every request."""
    try:
        return queryset.get()
    except queryset.model.DoesNotExist:
        return None


# --- Credentials ---------------------------------------------------------------------------


def _hash_token(token: str) -> str:
    return sha256_hex(token.encode("utf-8"))


def _clean_label(label: str) -> str:
    label = (label or "").strip()
    if not label:
        raise ValidationError({"label": "Name the worker (e.g. 'gpu-node-1'), to tell it apart."})
    if len(label) > 100:
        raise ValidationError({"label": "Use at most 100 characters."})
    return label


def site_credential_create(
    *, acting_user, institution: Institution, label: str, public_key: str = ""
) -> tuple[SiteCredential, str]:
    """Create a site worker's credentials and return them with the token.

    The token is returned once and never stored (only its SHA-256 and its first
    characters are). ``public_key`` is the worker's Ed25519 public key (PEM);
    left empty, the institution's registered worker key is used.
    """
    label = _clean_label(label)
    try:
        key = validate_worker_public_key(public_key)
    except ValidationError as exc:
        raise ValidationError({"public_key": exc.messages}) from None
    key = key or (institution.worker_public_key or "").strip()
    if not key:
        raise ValidationError(
            {
                "public_key": "Paste the worker's Ed25519 public key (PEM), or register a "
                "worker key on the institution first."
            }
        )
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    with transaction.atomic():
        credential = SiteCredential.objects.create(
            institution=institution,
            label=label,
            token_prefix=token[:TOKEN_PREFIX_LENGTH],
            token_hash=_hash_token(token),
            public_key=key,
            created_by=acting_user,
        )
        append_entry(
            event=ledger_events.CREDENTIAL_CREATED,
            actor=acting_user,
            subject=credential,
            consortium_slug=institution.consortium.slug,
            institution_slug=institution.slug,
            payload={
                "label": label,
                "token_prefix": credential.token_prefix,
                "key_fingerprint": key_fingerprint(key),
            },
        )
    return credential, token


def site_credential_revoke(*, acting_user, credential: SiteCredential) -> SiteCredential:
    """Revoke a worker's credentials: its token is refused from now on, and so
    are uploads in flight that have not been recorded yet."""
    with transaction.atomic():
        lock_chain()
        credential = (
            SiteCredential.objects.select_for_update(of=("self",))
            .select_related("institution__consortium")
            .get(pk=credential.pk)
        )
        if credential.revoked_at is not None:
            raise ConflictError(
                f"The credential '{credential.label}' ({credential.token_prefix}…) was already "
                f"revoked on {credential.revoked_at:%Y-%m-%d %H:%M} UTC.",
                code="already_revoked",
            )
        credential.revoked_at = timezone.now()
        credential.revoked_by = acting_user
        credential.save(update_fields=["revoked_at", "revoked_by"])
        append_entry(
            event=ledger_events.CREDENTIAL_REVOKED,
            actor=acting_user,
            subject=credential,
            consortium_slug=credential.institution.consortium.slug,
            institution_slug=credential.institution.slug,
            payload={"label": credential.label, "token_prefix": credential.token_prefix},
        )
    return credential


def site_credential_authenticate(token: str) -> SiteCredential | None:
    """The live credential this token belongs to, or None (unknown or revoked).

    Tokens are looked up by their SHA-256, so no comparison runs over the
    secret itself. ``last_used_at`` is written at most once a minute.
    """
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return None
    digest = _hash_token(token)
    credential = _one(
        SiteCredential.objects.select_related("institution__consortium").filter(token_hash=digest)
    )
    if credential is None or not hmac.compare_digest(credential.token_hash, digest):
        return None
    if credential.revoked_at is not None:
        return None
    now = timezone.now()
    if credential.last_used_at is None or now - credential.last_used_at >= LAST_USED_RESOLUTION:
        SiteCredential.objects.filter(pk=credential.pk).filter(
            Q(last_used_at__isnull=True) | Q(last_used_at__lte=now - LAST_USED_RESOLUTION)
        ).update(last_used_at=now)
        credential.last_used_at = now
    return credential


def site_token_revoked(token: str) -> bool:
    """Whether ``token`` belongs to a revoked credential (to say so when refusing it)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        return False
    return SiteCredential.objects.filter(
        token_hash=_hash_token(token), revoked_at__isnull=False
    ).exists()


def site_actor_repr(credential: SiteCredential) -> str:
    """How a site worker appears as the actor of a ledger entry."""
    return (
        f"site {credential.institution.slug} worker '{credential.label}' "
        f"({credential.token_prefix}…)"
    )


# --- Reads for the site API ------------------------------------------------------------------


def site_job(credential: SiteCredential, job_id: int) -> TrainingJob | None:
    """The job, if the credential's institution is an active participant of it."""
    return _one(
        TrainingJob.objects.select_related("consortium").filter(
            pk=job_id,
            participants__institution_id=credential.institution_id,
            participants__status=JobParticipant.Status.ACTIVE,
        )
    )


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
    update = _one(
        SiteUpdate.objects.select_related("round__job").filter(
            round__job_id=job_id,
            round__index=round_index,
            institution_id=credential.institution_id,
            # One join: the same participant row is the site's, and active.
            round__job__participants__institution_id=credential.institution_id,
            round__job__participants__status=JobParticipant.Status.ACTIVE,
        )
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
    the previous site's result). Another site's start model is not among them."""
    if not is_digest(digest):
        return False
    if GlobalModel.objects.filter(job=job, digest=digest).exists():
        return True
    return SiteUpdate.objects.filter(
        round__job=job, institution_id=credential.institution_id, start_digest=digest
    ).exists()


# --- Receiving updates ---------------------------------------------------------------------


@dataclass
class VerifiedUpdate:
    """What the checks established about an upload."""

    samples: int
    size_bytes: int
    pipeline: list
    privacy_events: list
    metrics: dict


@functools.lru_cache(maxsize=16)
def _model_layout(digest: str) -> dict[str, tuple[str, tuple[int, ...], bool]]:
    """``{name: (dtype, shape, floating)}`` of a stored global model. Artifacts
    are content-addressed, so the layout of a digest never changes."""
    from training.fl.serialization import unpack_tensors

    tensors = unpack_tensors(artifact_store().get(digest))
    return {
        name: (str(t.dtype).removeprefix("torch."), tuple(t.shape), t.is_floating_point())
        for name, t in tensors.items()
    }


def _check_tensors(data: bytes, start_digest: str) -> None:
    """The update's tensors against those of the model the site was sent: names,
    shapes, dtypes, finite values. Raises _Reject naming the tensor and what is
    wrong."""
    import torch

    from training.fl.serialization import MalformedTensorFile, unpack_tensors

    try:
        tensors = unpack_tensors(data, max_bytes=settings.FL_MAX_UPDATE_BYTES)
    except MalformedTensorFile as exc:
        raise _Reject("malformed", str(exc)) from None
    try:
        layout = _model_layout(start_digest)
    except ArtifactError as exc:
        # The central side's own fault, nothing the site did: refused, not recorded,
        # so the site can upload again once the store is repaired.
        raise UpdateRefused(
            f"The model this site was sent cannot be read here ({exc}); try again later.",
            code="global_model_unavailable",
            status=503,
        ) from None
    shape_text = lambda shape: "[" + ", ".join(str(d) for d in shape) + "]"  # noqa: E731
    for name in sorted(tensors):
        kind, _, base = name.partition("/")
        if kind not in ("delta", "mask") or base not in layout:
            raise _Reject(
                "tensor_mismatch",
                f"unexpected tensor {name!r}: an update holds delta/<name> and mask/<name> "
                "for the tensors of the model the site was sent",
            )
        tensor = tensors[name]
        _dtype, shape, floating = layout[base]
        if not floating:
            raise _Reject(
                "tensor_mismatch",
                f"unexpected tensor {name!r}: the model's {base} is not floating-point "
                "and is not trained",
            )
        want = torch.float32 if kind == "delta" else torch.bool
        if tensor.dtype != want:
            raise _Reject(
                "tensor_mismatch",
                f"{name} has dtype {str(tensor.dtype).removeprefix('torch.')}, expected "
                f"{str(want).removeprefix('torch.')}",
            )
        if tuple(tensor.shape) != shape:
            raise _Reject(
                "tensor_mismatch",
                f"{name} has shape {shape_text(tensor.shape)}, expected {shape_text(shape)} "
                f"(the {base} of the model the site was sent)",
            )
    missing = [
        f"delta/{base}"
        for base, (_dtype, _shape, floating) in sorted(layout.items())
        if floating and f"delta/{base}" not in tensors
    ]
    if missing:
        raise _Reject(
            "tensor_mismatch", f"missing tensor {missing[0]} (the model the site was sent has it)"
        )
    for name in sorted(tensors):
        if name.startswith("delta/") and not bool(torch.isfinite(tensors[name]).all()):
            raise _Reject("not_finite", f"NaN or infinity in {name}")


def _json_safe(value: Any, what: str, depth: int = 0) -> None:
    if depth > 8:
        raise _Reject("bad_metadata", f"{what} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise _Reject("bad_metadata", f"{what} holds NaN or infinity")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Reject("bad_metadata", f"{what} has a key that is not a string")
            _json_safe(item, what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _json_safe(item, what, depth + 1)
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise _Reject("bad_metadata", f"{what} is not JSON")


def _check_metadata(*, metrics, pipeline, privacy_events) -> tuple[dict, list, list]:
    if not isinstance(metrics, dict):
        raise _Reject("bad_metadata", "metrics must be a JSON object")
    _json_safe(metrics, "metrics")
    if not isinstance(pipeline, list) or not all(isinstance(f, dict) for f in pipeline):
        raise _Reject("bad_metadata", "pipeline must be a JSON list of filters, each an object")
    _json_safe(pipeline, "pipeline")
    if not isinstance(privacy_events, list):
        raise _Reject("bad_privacy_events", "privacy events must be a JSON list")
    events = []
    for i, raw in enumerate(privacy_events):
        try:
            events.append(PrivacyEvent.from_json(raw).to_json())
        except (ValueError, TypeError) as exc:
            raise _Reject("bad_privacy_events", f"privacy event {i}: {exc}") from None
    for what, value in (("metrics", metrics), ("pipeline", pipeline), ("privacy events", events)):
        if len(json.dumps(value)) > MAX_METADATA_CHARS:
            raise _Reject("bad_metadata", f"{what} is longer than {MAX_METADATA_CHARS} characters")
    return metrics, pipeline, events


def _verify(
    *,
    credential: SiteCredential,
    job: TrainingJob,
    rnd: Round,
    start_digest: str,
    data: bytes,
    samples: int,
    update_digest: str,
    signature: str,
    metrics,
    privacy_events,
    pipeline,
) -> VerifiedUpdate:
    """Every check that needs no lock, in the order a site can act on. Raises _Reject."""
    from training.fl.signing import BadSignature, update_message, verify_update

    limit = settings.FL_MAX_UPDATE_BYTES
    if len(data) > limit:
        raise _Reject(
            "too_large", f"the update is {len(data)} bytes, over the limit of {limit}", 413
        )
    if not is_digest(update_digest) or sha256_hex(data) != update_digest:
        raise _Reject("digest_mismatch", "digest mismatch: the upload was truncated or altered")
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise _Reject(
            "bad_samples", f"the sample count must be a whole number of at least 1, got {samples!r}"
        )
    slug = credential.institution.slug
    try:
        message = update_message(
            job_id=job.pk,
            round_index=rnd.index,
            site=slug,
            update_digest=update_digest,
            samples=samples,
        )
        verify_update(credential.public_key, message, signature)
    except BadSignature as exc:
        raise _Reject(
            "bad_signature",
            f"the signature does not verify with the key of credential "
            f"'{credential.label}' ({credential.token_prefix}…): {exc}",
        ) from None
    _check_tensors(data, start_digest)
    key = job.spec.get("dataset_key")
    dataset = _one(SiteDataset.objects.filter(institution_id=credential.institution_id, key=key))
    if dataset is None:
        raise _Reject("bad_samples", f"{slug} no longer offers the data set '{key}'")
    if not 1 <= samples <= dataset.num_records:
        raise _Reject(
            "bad_samples",
            f"{samples} samples is not between 1 and the {dataset.num_records} records of "
            f"'{key}' at {slug}",
        )
    metrics, pipeline, events = _check_metadata(
        metrics=metrics, pipeline=pipeline, privacy_events=privacy_events
    )
    return VerifiedUpdate(
        samples=samples,
        size_bytes=len(data),
        pipeline=pipeline,
        privacy_events=events,
        metrics=metrics,
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


def _first_look(credential: SiteCredential, job_id: int, round_index: int):
    """Unlocked: the job (through the site's participant row, which the participation check
    reads too), the round and the site's ``SiteUpdate`` row, in two queries; or a refusal that
    is not recorded (no such job or round for this site, the round not open)."""
    participant = _one(
        JobParticipant.objects.select_related("job__consortium").filter(
            job_id=job_id, institution_id=credential.institution_id
        )
    )
    if participant is None:
        raise UpdateRefused("Not found.", code="not_found", status=404)
    job = participant.job
    update = _one(
        SiteUpdate.objects.select_related("round__global_model_in").filter(
            round__job=job, round__index=round_index, institution_id=credential.institution_id
        )
    )
    if update is not None:
        rnd = update.round
    else:
        rnd = _one(
            Round.objects.select_related("global_model_in").filter(job=job, index=round_index)
        )
    _check_round(rnd, job, round_index)
    return job, rnd, update, participant


def _locked_look(credential: SiteCredential, job: TrainingJob, round_index: int):
    """Under the chain lock: the round and the site's ``SiteUpdate`` row read again and locked,
    the round first (the coordinator's claim of a round updates the round, then its rows), since
    either may have moved since the first look. The job's spec and consortium do not move."""
    rnd = _one(
        Round.objects.select_for_update(of=("self",))
        .select_related("global_model_in")
        .filter(job=job, index=round_index)
    )
    _check_round(rnd, job, round_index)
    update = _one(
        SiteUpdate.objects.select_for_update(of=("self",)).filter(
            round=rnd, institution_id=credential.institution_id
        )
    )
    return rnd, update


def _participation_rejection(
    credential: SiteCredential,
    job: TrainingJob,
    *,
    live: bool,
    participant: JobParticipant | None,
) -> _Rejection | None:
    """Rejections that come from who uploads, not from what: a credential no longer live, a
    site no longer taking part."""
    if not live:
        return _Rejection(
            "credential_revoked",
            f"the credential '{credential.label}' ({credential.token_prefix}…) is revoked",
            401,
        )
    if participant is None or participant.status != JobParticipant.Status.ACTIVE:
        why = (
            f" ({participant.removed_reason})" if participant and participant.removed_reason else ""
        )
        return _Rejection(
            "not_participant",
            f"{credential.institution.slug} no longer takes part in job #{job.pk}{why}",
            403,
        )
    return None


def _participation_now(credential: SiteCredential, job: TrainingJob) -> _Rejection | None:
    """The participation check on fresh rows, in one query: under the locks, since the
    credential may have been revoked, or the site removed from the job, since the request was
    authenticated (revocation and removal take the chain lock, so what is read here holds
    until the outcome commits)."""
    still_live = SiteCredential.objects.filter(pk=credential.pk, revoked_at__isnull=True)
    participant = _one(
        JobParticipant.objects.filter(job=job, institution_id=credential.institution_id).annotate(
            credential_live=Exists(still_live)
        )
    )
    live = participant.credential_live if participant is not None else still_live.exists()
    return _participation_rejection(credential, job, live=live, participant=participant)


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
    job: TrainingJob,
    rnd: Round,
    credential: SiteCredential,
    rejection: _Rejection,
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
    _ask_to_close(job, rnd)


def _record_acceptance(
    update: SiteUpdate,
    *,
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
    _ask_to_close(job, rnd)


def _ask_to_close(job: TrainingJob, rnd: Round) -> None:
    """Once the transaction commits, ask the coordinator to close the round, when the update
    just recorded (accepted or rejected) may let it move: in a FedAvg round, when no site is
    still expected (the round then closes on its last upload, not on the next periodic tick);
    in a cyclic round, always (the next site is sent once this one has reported).

    Called under the chain lock, which every upload takes, so exactly one upload of a FedAvg
    round sees no site left; a lost message costs one tick of ``rounds_tick``."""
    if job.spec.get("topology") != "cyclic" and (
        SiteUpdate.objects.filter(round_id=rnd.pk, status=SiteUpdate.Status.DISPATCHED).exists()
    ):
        return
    round_pk = rnd.pk
    transaction.on_commit(
        lambda: current_app.send_task(
            queues.ROUND_MAYBE_CLOSE.name, args=[round_pk], queue=queues.ROUND_MAYBE_CLOSE.queue
        )
    )


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
    round, or an update already received are only refused).
    """
    site = credential.institution.slug
    digest = update_digest if isinstance(update_digest, str) else ""

    # Unlocked first look: a duplicate or a refused state costs no verification. The
    # credential is as authenticated; everything is read again under the locks below.
    job, rnd, update, participant = _first_look(credential, job_id, round_index)
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
            verified = _verify(
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
            )
        except _Reject as exc:
            rejection = exc.rejection
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
        lock_chain()
        rnd, update = _locked_look(credential, job, round_index)
        state = _status_refusal(update, site=site, round_index=round_index, digest=digest)
        if isinstance(state, SiteUpdate):
            state.duplicate = True
            return state
        if state is not None:
            raise state
        rejection = _participation_now(credential, job) or rejection
        if rejection is not None:
            _record_rejection(
                update,
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
                job=job,
                rnd=rnd,
                credential=credential,
                verified=verified,
                update_digest=digest,
                signature=signature,
            )
    if rejection is not None:
        raise rejection.refused(recorded=True)
    update.duplicate = False
    return update


def update_refuse_oversize(
    *, credential: SiteCredential, job_id: int, round_index: int, size: int
) -> None:
    """Record an upload refused while it was read, for being over the size limit
    (the API stops reading it). Raises :class:`UpdateRefused` (413) always."""
    limit = settings.FL_MAX_UPDATE_BYTES
    rejection = _Rejection(
        "too_large", f"the update is over the limit of {limit} bytes ({size} or more)", 413
    )
    site = credential.institution.slug
    with transaction.atomic():
        lock_chain()
        job, _rnd, _update, _participant = _first_look(credential, job_id, round_index)
        rnd, update = _locked_look(credential, job, round_index)
        state = _status_refusal(update, site=site, round_index=round_index, digest="")
        if isinstance(state, SiteUpdate):  # pragma: no cover - digest "" never matches
            raise rejection.refused(recorded=False)
        if state is not None:
            raise state
        rejection = _participation_now(credential, job) or rejection
        _record_rejection(
            update,
            job=job,
            rnd=rnd,
            credential=credential,
            rejection=rejection,
            update_digest="",
            size=size,
        )
    raise rejection.refused(recorded=True)
