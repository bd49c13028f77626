"""The approvers' picture of what the privacy audit's attacks rebuild, drawn centrally from
**public** data (the Celery task ``training.audit_picture``, :mod:`training.rounds.tasks`).

The sites' audits (``training.site.audit``) report figures only: a site's records, and what
the attacks rebuilt of them, never leave the site. So that an approver can *see* what a
figure such as "similarity 0.96" means, the coordinator runs the same attack on one record of
a bundled public data set whose records have the job's shape (:data:`BUNDLED_SHAPES`),
against the very model the job would start from (built with the job's initial seed,
:func:`training.rounds.states.initial_seed`), under the job's optimizer and privacy pipeline,
and keeps the PNG and that record's figures on :class:`~training.models.AuditPicture`.

When no bundled set has records of the job's shape, or the model is beyond the audit's
reach, no picture is drawn: the row keeps a ``note`` in words instead, which the review page
shows. Drawing is idempotent (a drawn picture, or a note, is final for its spec digest; a
changed spec asks for a new picture under its new digest) and a second delivery of the task
that races the first writes nothing (compare-and-set on ``drawn_at``).

torch is imported inside :func:`draw_audit_picture` only, like :mod:`training.rounds.states`:
the web process imports this module through the tasks it may queue and never draws.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from django.utils import timezone

from training.jobs.registry import model_registry
from training.jobs.spec import privacy_audit_settings
from training.models import AuditPicture, Modality, SiteDataset, TrainingJob
from training.rounds import states

__all__ = [
    "BUNDLED_SHAPES",
    "BundledShape",
    "audit_picture_png",
    "bundled_match",
    "draw_audit_picture",
]


@dataclass(frozen=True)
class BundledShape:
    """A bundled public set as a site would register it (``SiteDataset`` terms): what a job's
    records must look like for the picture to be drawn from that set."""

    key: str
    modality: str
    input_shape: tuple[int, ...]
    n_classes: int


#: The bundled sets (``training.fl.holdout.BUNDLED_DATASETS``) by the shape of their records;
#: the digits are offered both as 64 features and, to an image model, as ``[1, 8, 8]``
#: (:func:`training.fl.inversion.bundled_records`). tests/web/test_audit_review.py checks
#: this table against the data itself.
BUNDLED_SHAPES: tuple[BundledShape, ...] = (
    BundledShape("digits", Modality.TABULAR, (64,), 10),
    BundledShape("digits", Modality.IMAGE, (1, 8, 8), 10),
    BundledShape("breast-cancer", Modality.TABULAR, (30,), 2),
    BundledShape("lesions", Modality.SEGMENTATION, (1, 32, 32), 2),
)


def _shape_words(modality: str, shape: tuple[int, ...]) -> str:
    shape_text = f"[{', '.join(str(int(d)) for d in shape)}]"
    if modality == Modality.TABULAR:
        return f"{shape_text} features"
    if modality == Modality.SEGMENTATION:
        return f"{shape_text} images with masks"
    return f"{shape_text} images"


def bundled_match(dataset: SiteDataset) -> tuple[BundledShape | None, str]:
    """``(the bundled set to draw from, "")``, or ``(None, why none fits)`` in words: a set
    fits when its records have the same modality and shape as the job's and its labels are
    among the classes the job's model is built for (so the model is the job's own)."""
    shape = tuple(int(d) for d in dataset.input_shape)
    same_shape = [
        b for b in BUNDLED_SHAPES if b.modality == dataset.modality and b.input_shape == shape
    ]
    words = _shape_words(dataset.modality, shape)
    if not same_shape:
        return None, (
            f"No bundled public data set has records of this job's shape ({words}), so no "
            "picture is drawn; the figures are your sites' own."
        )
    for candidate in same_shape:
        if candidate.n_classes <= dataset.n_classes:
            return candidate, ""
    bundled = same_shape[0]
    return None, (
        f"The bundled public data set {bundled.key} has records of this job's shape ({words}) "
        f"but {bundled.n_classes} classes, more than the {dataset.n_classes} this job's model "
        "is built for, so no picture is drawn; the figures are your sites' own."
    )


def _sentence(exc: Exception) -> str:
    """An exception's message as the end of a sentence."""
    text = str(exc).strip().rstrip(".")
    return f"{text}." if text else "no reason was given."


def _finish(picture: AuditPicture, **fields: object) -> bool:
    """Store the outcome unless another delivery of the task stored one first."""
    done = AuditPicture.objects.filter(pk=picture.pk, drawn_at__isnull=True).update(
        drawn_at=timezone.now(), **fields
    )
    return bool(done)


def draw_audit_picture(*, job_id: int, spec_digest: str) -> str:
    """Draw (or explain the absence of) the audit picture of job ``job_id`` under the spec
    digest ``spec_digest``; returns a short status for the task's log."""
    job = TrainingJob.objects.filter(pk=job_id).first()
    if job is None:
        return f"job {job_id}: no such job"
    if job.spec_digest != spec_digest:
        # The spec changed since the task was queued: its new digest has its own picture.
        return f"job {job_id}: spec {spec_digest[:12]} is no longer current; nothing drawn"
    if job.is_terminal:
        return f"job {job_id}: the job has ended; nothing drawn"
    spec = job.spec
    audit = privacy_audit_settings(spec)
    if audit is None:
        return f"job {job_id}: the spec asks for no privacy audit; nothing drawn"
    picture, _ = AuditPicture.objects.get_or_create(job=job, spec_digest=spec_digest)
    if picture.drawn_at is not None:
        return f"job {job_id}: already drawn"
    try:
        dataset = states.dataset_of(job, spec)
    except ValueError as exc:
        _finish(picture, note=f"No picture is drawn: {_sentence(exc)}")
        return f"job {job_id}: no data set described"
    bundled, why_not = bundled_match(dataset)
    if bundled is None:
        _finish(picture, note=why_not)
        return f"job {job_id}: no bundled data set fits"

    import torch  # lazy: see the module docstring

    from training.fl.inversion import AuditOutOfReach, AuditSettings, reconstruction_picture

    model_modality = model_registry()[spec["model"]["name"]].modality
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(states.initial_seed(job))
            model = states.build_model(spec, dataset)
        png, figures = reconstruction_picture(
            model,
            bundled.key,
            optimizer=spec["optimizer"],
            pipeline=spec["privacy_pipeline"],
            settings=AuditSettings(seed=int(audit["seed"])),
            image_model=model_modality == Modality.IMAGE,
        )
    except AuditOutOfReach as exc:
        _finish(
            picture,
            dataset_key=bundled.key,
            note=f"No picture is drawn, this model is beyond the audit's reach: {_sentence(exc)}",
        )
        return f"job {job_id}: out of the audit's reach"
    except ValueError as exc:
        # A spec the engine cannot run as given: said on the page rather than retried forever.
        _finish(
            picture, dataset_key=bundled.key, note=f"No picture could be drawn: {_sentence(exc)}"
        )
        return f"job {job_id}: not drawn ({exc})"
    stored = _finish(
        picture,
        dataset_key=bundled.key,
        png=png,
        figures=dataclasses.asdict(figures),
        note="",
    )
    return f"job {job_id}: picture drawn from {bundled.key}" + ("" if stored else " (kept)")


def audit_picture_png(job: TrainingJob) -> bytes | None:
    """The PNG drawn for the job's current spec digest, or ``None`` while none is (being
    drawn, none fits, or the spec asks for no audit). Public data only, by construction."""
    png = (
        AuditPicture.objects.filter(job=job, spec_digest=job.spec_digest)
        .values_list("png", flat=True)
        .first()
    )
    return bytes(png) if png else None
