"""The checks an uploaded update must pass before it can count, none of which needs a lock.

:func:`verify_upload` runs them in the order a site can act on: the size is within
``settings.FL_MAX_UPDATE_BYTES``, the bytes hash to the declared digest, the sample count is a
whole number, the site's Ed25519 signature holds over
``training.fl.signing.update_message(...)``, the file is an update in the wire format
(``training.fl.update``) whose tensors match the model the site was sent
(``SiteUpdate.start_digest``, from which the update is a delta) with finite values, the sample
count is plausible for the site's data set, the update keeps to the privacy floor (no more
coordinates leave the site than the job's pipeline and the agreement allow, and no excluded
layer: :func:`_check_privacy_floor`), and the metrics, pipeline and privacy events are valid
JSON of bounded size. A failed check raises :class:`Rejected`, whose
:class:`Rejection` the intake (``training.rounds.intake``) records; a start model the central
side cannot read raises :class:`StartModelUnavailable`, which is nobody's fault at the site
and is not recorded.

A replay raises :class:`Replayed`, which the intake refuses without recording it: an update
made for another round is not this round's work, and whoever sent it again (an attacker
holding the token, or a confused worker re-sending an old upload) must not cost the site its
own update for this round. What is a replay, and what is a genuinely bad update:

* the bytes hash to the declared digest, and that digest is already on another update row
  (this site's for another job or round, or another site's): a byte-identical copy of an
  update received elsewhere, whatever it is signed for;
* the signature does not verify for this job, round, site and sample count, but does verify
  with one of the site's keys (its credentials, revoked ones included: a key since rotated
  signed older updates) over :func:`~training.fl.signing.update_message` for another job and
  round this site was asked for (its last :data:`REPLAY_LOOKBACK` update rows): an update
  signed for another round.

Everything else stays the site's own doing and is rejected as before: a digest that does not
match the bytes, a signature that verifies for nothing of this site's, bad tensors, NaN,
implausible samples. The digest is checked before the copy (a declared digest of an old
update over other bytes is tampering, not a replay), and the copy before the signature.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from consortium.core.prepared import PreparedQuery
from training.fl import update as wire
from training.fl.signing import BadSignature, update_message, verify_update
from training.jobs.accounting import PrivacyEvent
from training.jobs.spec import shared_fraction
from training.models import Round, SiteCredential, SiteDataset, SiteUpdate, TrainingJob
from training.rounds.artifacts import ArtifactError, artifact_store, is_digest, sha256_hex
from training.rounds.lookups import one_or_none

__all__ = [
    "MAX_METADATA_CHARS",
    "REPLAY_LOOKBACK",
    "Rejected",
    "Replayed",
    "Rejection",
    "StartModelUnavailable",
    "VerifiedUpdate",
    "verify_upload",
]

#: Largest metrics / pipeline / privacy-events JSON kept per update.
MAX_METADATA_CHARS = 16_384

#: How many of the site's latest update rows (other rounds) a signature that does not verify
#: for this round is tried against before it is called bad: each costs one Ed25519
#: verification per key of the site, and only on that path.
REPLAY_LOOKBACK = 200


@dataclass
class Rejection:
    """A failed check, before it is recorded: its code, the reason (what the site is told and
    what the ledger keeps) and the HTTP status the API answers."""

    code: str
    reason: str
    status: int = 400


class Rejected(Exception):
    """A check failed: ``rejection`` says which and why."""

    def __init__(self, code: str, reason: str, status: int = 400):
        super().__init__(reason)
        self.rejection = Rejection(code=code, reason=reason, status=status)


class Replayed(Exception):
    """The upload is a replay (an update made for another job or round, or a copy of an
    update already received): refused, never recorded against the site. The message says
    what it is."""


class StartModelUnavailable(Exception):
    """The model the site was sent cannot be read from the artifact store (the message
    says why): the central side's own fault, so the upload is refused and not recorded."""


@dataclass
class VerifiedUpdate:
    """What the checks established about an upload."""

    samples: int
    size_bytes: int
    pipeline: list
    privacy_events: list
    metrics: dict


@functools.lru_cache(maxsize=16)
def _model_layout(digest: str) -> dict[str, wire.TensorLayout]:
    """The layout of a stored model (:func:`training.fl.update.model_layout`). Artifacts are
    content-addressed, so the layout of a digest never changes."""
    return wire.model_layout(artifact_store().get(digest))


def _check_tensors(data: bytes, start_digest: str) -> dict:
    """The update's tensors against those of the model the site was sent (names, shapes,
    dtypes, finite values: ``training.fl.update.check_update``), returned once checked. Raises
    :class:`Rejected` naming the tensor and what is wrong."""
    try:
        tensors = wire.read_update(data, max_bytes=settings.FL_MAX_UPDATE_BYTES)
    except wire.BadUpdate as exc:
        raise Rejected(exc.code, exc.reason) from None
    try:
        layout = _model_layout(start_digest)
    except ArtifactError as exc:
        raise StartModelUnavailable(str(exc)) from None
    try:
        wire.check_update(tensors, layout)
    except wire.BadUpdate as exc:
        raise Rejected(exc.code, exc.reason) from None
    return tensors


def _check_privacy_floor(tensors: dict, job: TrainingJob) -> None:
    """What a site's update shares must be what its hospital agreed to, whatever its worker
    does: a modified worker could otherwise send more than its pipeline (and its agreement)
    allow. A coordinate counts as shared when its mask says so or its value is not zero (the
    pipeline zeroes what it does not share, so a value outside the mask still left the
    hospital); a tensor without a mask is shared whole. Refused (and recorded, as every
    rejection) when an ``exclude_layers`` layer is shared at all, or when more coordinates are
    shared than the smaller of the job's pipeline fraction and the agreement's maximum share
    allows (plus the pipeline's own rounding: half a coordinate per fraction filter)."""
    spec = job.spec
    pipeline = list(spec.get("privacy_pipeline") or [])
    delta, mask = wire.split_update(tensors)
    shared: dict[str, int] = {}
    for name, values in delta.items():
        marked = mask.get(name)
        if marked is None:
            shared[name] = values.numel()
        else:
            shared[name] = int((marked | (values != 0)).sum())
    for entry in pipeline:
        if entry.get("filter") != "exclude_layers":
            continue
        for prefix in entry.get("layers") or []:
            leaked = sorted(n for n, count in shared.items() if n.startswith(prefix) and count)
            if leaked:
                raise Rejected(
                    "privacy_floor",
                    f"{leaked[0]} is shared ({shared[leaked[0]]} coordinates), but the job's "
                    f"pipeline excludes the layers starting with {prefix!r}: they never leave "
                    "the site",
                )
    total = sum(values.numel() for values in delta.values())
    agreed = float(job.agreement_version.max_shared_fraction) if job.agreement_version else 1.0
    planned = shared_fraction(spec)
    fraction = min(agreed, planned)
    filters = sum(1 for f in pipeline if f.get("filter") in ("partial_sharing", "svt"))
    allowed = math.floor(fraction * total + 0.5 * filters + 1e-9)
    count = sum(shared.values())
    if count > allowed:
        raise Rejected(
            "privacy_floor",
            f"the update shares {count} of the model's {total} coordinates "
            f"({100 * count / total:.1f}%); the job's pipeline shares at most "
            f"{100 * planned:g}% and the agreement in force at most {100 * agreed:g}%, so at "
            f"most {allowed} may leave the site",
        )


def _json_safe(value: Any, what: str, depth: int = 0) -> None:
    if depth > 8:
        raise Rejected("bad_metadata", f"{what} is nested too deeply")
    if isinstance(value, float) and not math.isfinite(value):
        raise Rejected("bad_metadata", f"{what} holds NaN or infinity")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise Rejected("bad_metadata", f"{what} has a key that is not a string")
            _json_safe(item, what, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _json_safe(item, what, depth + 1)
    elif not (value is None or isinstance(value, bool | int | float | str)):
        raise Rejected("bad_metadata", f"{what} is not JSON")


def _check_metadata(*, metrics, pipeline, privacy_events) -> tuple[dict, list, list]:
    if not isinstance(metrics, dict):
        raise Rejected("bad_metadata", "metrics must be a JSON object")
    _json_safe(metrics, "metrics")
    if not isinstance(pipeline, list) or not all(isinstance(f, dict) for f in pipeline):
        raise Rejected("bad_metadata", "pipeline must be a JSON list of filters, each an object")
    _json_safe(pipeline, "pipeline")
    if not isinstance(privacy_events, list):
        raise Rejected("bad_privacy_events", "privacy events must be a JSON list")
    events = []
    for i, raw in enumerate(privacy_events):
        try:
            events.append(PrivacyEvent.from_json(raw).to_json())
        except (ValueError, TypeError) as exc:
            raise Rejected("bad_privacy_events", f"privacy event {i}: {exc}") from None
    for what, value in (("metrics", metrics), ("pipeline", pipeline), ("privacy events", events)):
        if len(json.dumps(value)) > MAX_METADATA_CHARS:
            raise Rejected("bad_metadata", f"{what} is longer than {MAX_METADATA_CHARS} characters")
    return metrics, pipeline, events


def _copy_reason(copy_of_pk: int, credential: SiteCredential) -> str:
    copy = one_or_none(SiteUpdate.objects.select_related("round").filter(pk=copy_of_pk))
    if copy is None:  # pragma: no cover - the row was deleted since the first look
        where = "another update"
    elif copy.institution_id == credential.institution_id:
        where = f"this site's update for job #{copy.round.job_id} round {copy.round.index}"
    else:
        where = f"another site's update (job #{copy.round.job_id} round {copy.round.index})"
    return (
        f"replayed update: these bytes were already received as {where}; a round takes "
        "only an update made for it (nothing was recorded: send this round's own update)"
    )


def _signed_for_another_round(
    *, credential: SiteCredential, rnd: Round, update_digest: str, samples: int, signature: str
) -> tuple[int, int] | None:
    """The (job, round) of this site's, other than ``rnd``, for which ``signature`` verifies
    with one of the site's keys, or None (see the module docstring)."""
    institution_id = credential.institution_id
    keys = list(
        SiteCredential.objects.filter(institution_id=institution_id)
        .order_by("-pk")
        .values_list("public_key", flat=True)
    )
    rounds = (
        SiteUpdate.objects.filter(institution_id=institution_id)
        .exclude(round_id=rnd.pk)
        .order_by("-pk")
        .values_list("round__job_id", "round__index")[:REPLAY_LOOKBACK]
    )
    slug = credential.institution.slug
    for job_id, index in rounds:
        message = update_message(
            job_id=job_id,
            round_index=index,
            site=slug,
            update_digest=update_digest,
            samples=samples,
        )
        for key in keys:
            try:
                verify_update(key, message, signature)
            except BadSignature:
                continue
            return job_id, index
    return None


#: The site's data set, read on every upload (compiled once per connection:
#: consortium.core.prepared).
_SITE_DATASET = PreparedQuery(
    lambda institution_id, key: SiteDataset.objects.filter(institution_id=institution_id, key=key),
    one=True,
    institution_id=int,
    key=str,
)


def verify_upload(
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
    copy_of_pk: int | None = None,
) -> VerifiedUpdate:
    """Every check that needs no lock, in the order a site can act on. ``copy_of_pk`` is
    another update row with the same digest, if the caller found one. Raises
    :class:`Rejected`, :class:`Replayed`, or :class:`StartModelUnavailable`."""
    limit = settings.FL_MAX_UPDATE_BYTES
    if len(data) > limit:
        raise Rejected(
            "too_large", f"the update is {len(data)} bytes, over the limit of {limit}", 413
        )
    if not is_digest(update_digest) or sha256_hex(data) != update_digest:
        raise Rejected("digest_mismatch", "digest mismatch: the upload was truncated or altered")
    if copy_of_pk is not None:
        raise Replayed(_copy_reason(copy_of_pk, credential))
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise Rejected(
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
        elsewhere = _signed_for_another_round(
            credential=credential,
            rnd=rnd,
            update_digest=update_digest,
            samples=samples,
            signature=signature,
        )
        if elsewhere is not None:
            raise Replayed(
                f"replayed update: this update was signed for job #{elsewhere[0]} round "
                f"{elsewhere[1]}, not for job #{job.pk} round {rnd.index} (nothing was "
                "recorded: send this round's own update)"
            ) from None
        raise Rejected(
            "bad_signature",
            f"the signature does not verify with the key of credential "
            f"'{credential.label}' ({credential.token_prefix}…): {exc}",
        ) from None
    tensors = _check_tensors(data, start_digest)
    key = job.spec.get("dataset_key")
    dataset = (
        _SITE_DATASET.one_or_none(institution_id=credential.institution_id, key=key)
        if isinstance(key, str)
        else None
    )
    if dataset is None:
        raise Rejected("bad_samples", f"{slug} no longer offers the data set '{key}'")
    if not 1 <= samples <= dataset.num_records:
        raise Rejected(
            "bad_samples",
            f"{samples} samples is not between 1 and the {dataset.num_records} records of "
            f"'{key}' at {slug}",
        )
    _check_privacy_floor(tensors, job)
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
