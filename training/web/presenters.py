"""Read-only helpers that turn jobs and specs into what the pages show.

Nothing here writes: the pages call these to word a job for people (the review
page an approver reads before deciding, the job page's spec summary), and the
budget figures are always replayed by the accountant from stored events.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

from consortium.governance.models import Institution
from training.fl.params import FILTER_NAMES, FILTER_PARAMS, LayerList
from training.jobs.accounting import PrivacyEvent, epsilon_or_unbounded
from training.jobs.describe import describe_pipeline
from training.jobs.guarantees import Guarantee, guarantee_for_events, guarantee_for_spec
from training.jobs.registry import model_registry
from training.jobs.selectors import live_reservations
from training.jobs.spec import privacy_audit_settings, shared_fraction, training_records
from training.models import (
    PrivacyReservation,
    SiteDataset,
    TrainingJob,
)
from training.web.audit_presenters import (
    AuditPictureView,
    AuditStatus,
    audit_picture_view,
    audit_status,
    job_audit_statuses,
)

#: The spec paths (before any ``.`` or ``[``) and the job form field each maps to.
SPEC_PATH_FIELDS = {
    "participants": "participants",
    "dataset_key": "dataset_key",
    "purpose": "purpose",
    "model.name": "model",
    "model.params": "model_params",
    "model": "model",
    "topology": "topology",
    "rounds": "rounds",
    "local_epochs": "local_epochs",
    "batch_size": "batch_size",
    "optimizer.name": "optimizer",
    "optimizer.lr": "lr",
    "optimizer.momentum": "momentum",
    "optimizer": "optimizer",
    "momentum_restart": "momentum_restart",
    "privacy_pipeline": "privacy_pipeline",
    "min_participants": "min_participants",
    "round_timeout_seconds": "round_timeout_seconds",
    "approval_ttl_hours": "approval_ttl_hours",
    "contribution": "contribution",
}


def field_for_spec_path(path: str) -> str | None:
    """The form field a spec error path belongs to (``optimizer.lr`` -> ``lr``), or None."""
    path = path.strip()
    for prefix in sorted(SPEC_PATH_FIELDS, key=len, reverse=True):
        if path == prefix or path.startswith(prefix + ".") or path.startswith(prefix + "["):
            return SPEC_PATH_FIELDS[prefix]
    return None


def split_spec_error(text: str) -> tuple[str, str]:
    """``"optimizer.lr: must be ..."`` -> ``("optimizer.lr", "must be ...")``."""
    path, sep, message = text.partition(": ")
    if not sep or " " in path:
        return "", text
    return path, message


def _param_text(name: str, spec) -> str:
    if isinstance(spec, LayerList):
        return f"{name}: a non-empty list of layer names"
    text = f"{name}: {spec.message()}"
    default = getattr(spec, "default", None)
    if isinstance(default, str | int | float) and not isinstance(default, bool):
        text += f" (default {default})"
    return text


def filter_help() -> list[dict]:
    """Every privacy filter and its parameters, for the help table of the job form."""
    rows = []
    for name in FILTER_NAMES:
        params = FILTER_PARAMS[name]
        rows.append(
            {"name": name, "params": [_param_text(key, spec) for key, spec in params.items()]}
        )
    return rows


def model_choices() -> list[tuple[str, str]]:
    return [
        (name, f"{name} ({m.family}, {m.modality}): {m.description}")
        for name, m in sorted(model_registry().items())
    ]


def describe_model(spec: dict) -> str:
    """``mlp (Multilayer perceptron ...) with hidden_sizes=[64, 32], dropout=0.0``."""
    model = spec.get("model") or {}
    name = model.get("name", "?")
    registered = model_registry().get(name)
    text = name if registered is None else f"{name} — {registered.description.rstrip('.')}"
    params = model.get("params") or {}
    if params:
        text += " (" + ", ".join(f"{k}={json.dumps(v)}" for k, v in params.items()) + ")"
    return text


def spec_rows(spec: dict) -> list[tuple[str, str]]:
    """The spec as label/value pairs, in the order a person reads it."""
    optimizer = spec.get("optimizer") or {}
    opt = f"{optimizer.get('name', '?')}, learning rate {optimizer.get('lr')}"
    if optimizer.get("name") == "sgd":
        opt += f", momentum {optimizer.get('momentum')}"
    return [
        ("Purpose", str(spec.get("purpose", ""))),
        ("Participants", ", ".join(spec.get("participants") or [])),
        ("Data set key", str(spec.get("dataset_key", ""))),
        ("Model", describe_model(spec)),
        (
            "Topology",
            "cyclic (one site after another)"
            if spec.get("topology") == "cyclic"
            else "fedavg (server–client averaging)",
        ),
        ("Rounds", str(spec.get("rounds"))),
        ("Local epochs per round", str(spec.get("local_epochs"))),
        ("Batch size", str(spec.get("batch_size"))),
        ("Optimizer", opt),
        ("Momentum restarted each round", "yes" if spec.get("momentum_restart") else "no"),
        ("Minimum participants per round", str(spec.get("min_participants"))),
        ("Round timeout", f"{spec.get('round_timeout_seconds')} seconds"),
        ("Approval window", f"{spec.get('approval_ttl_hours')} hours"),
    ]


def percent(fraction: float) -> str:
    text = f"{fraction * 100:.2f}".rstrip("0").rstrip(".")
    return f"{text}%"


def job_spec_json(job: TrainingJob) -> str:
    """The spec, pretty-printed for people (the canonical text is for hashing)."""
    return json.dumps(job.spec, indent=2, sort_keys=True)


@dataclass
class InstitutionReview:
    """What one approver's institution is told about a job before deciding."""

    institution: Institution
    dataset: SiteDataset | None
    reservation: PrivacyReservation | None
    job_epsilon: float | None
    projected_epsilon: float | None
    cap: float | None
    delta: float | None
    decision: object = None  # the current valid decision, if any
    #: What the job's ε rests on, mechanism by mechanism (:mod:`training.jobs.guarantees`).
    guarantee: Guarantee | None = None
    #: What an attacker could rebuild from this institution's updates (its privacy audit).
    audit: AuditStatus | None = None

    @property
    def projected_unbounded(self) -> bool:
        """The projection has no guarantee at the agreement's δ (the accountant's infinity)."""
        return self.projected_epsilon is not None and not math.isfinite(self.projected_epsilon)


@dataclass
class JobReview:
    job: TrainingJob
    spec: dict
    model_text: str
    pipeline: list[str]
    shared_percent: str
    institutions: list[InstitutionReview] = field(default_factory=list)
    #: Every participant's privacy audit (None: the spec asks for none), and the picture of
    #: what the attack rebuilds from public data of the same shape.
    audits: list[AuditStatus] | None = None
    picture: AuditPictureView | None = None

    @property
    def other_audits(self) -> list[AuditStatus]:
        """The audits of the participants the reader does not approve for."""
        mine = {r.institution.pk for r in self.institutions}
        return [a for a in self.audits or [] if a.institution.pk not in mine]


def _events_of(text: str) -> list[PrivacyEvent]:
    return [PrivacyEvent.from_json(e) for e in json.loads(text)]


def _guarantee(
    spec: dict,
    reservation: PrivacyReservation | None,
    dataset: SiteDataset | None,
    *,
    delta: float | None,
    cap: float | None,
) -> Guarantee | None:
    """The institution's guarantee from the events its reservation holds (what the budget
    check charged); before any reservation, from the spec and its registered data set."""
    if delta is None:
        return None
    try:
        if reservation is not None:
            return guarantee_for_events(_events_of(reservation.events_text), delta=delta, cap=cap)
        if dataset is not None:
            records = training_records(dataset.num_records, spec)
            return guarantee_for_spec(spec, num_records=records, delta=delta, cap=cap)
    except (ValueError, KeyError, TypeError):
        return None  # a spec or reservation the accountant cannot read: the page says nothing
    return None


def job_review(job: TrainingJob, institutions, decisions: dict | None = None) -> JobReview:
    """The plain-words review of ``job`` for ``institutions`` (the approver's).

    The projected total replays every live reservation of the institution (this
    job's included) at the agreement's δ: the same figure the budget check used.
    """
    spec = job.spec
    institutions = list(institutions)
    ids = [i.pk for i in institutions]
    datasets = {
        d.institution_id: d
        for d in SiteDataset.objects.filter(institution_id__in=ids, key=spec.get("dataset_key"))
    }
    version = job.agreement_version
    delta = float(version.delta) if version is not None else None
    cap = float(version.epsilon_cap) if version is not None else None
    events: dict[int, list[PrivacyEvent]] = {}
    own: dict[int, PrivacyReservation] = {}
    for reservation in live_reservations(ids):
        events.setdefault(reservation.institution_id, []).extend(
            _events_of(reservation.events_text)
        )
        if reservation.job_id == job.pk:
            own[reservation.institution_id] = reservation
    review = JobReview(
        job=job,
        spec=spec,
        model_text=describe_model(spec),
        pipeline=describe_pipeline(spec),
        shared_percent=percent(shared_fraction(spec)),
    )
    audits = job_audit_statuses(job, own_ids=ids)
    audit_of = {a.institution.pk: a for a in audits}
    if privacy_audit_settings(spec) is not None:
        review.audits = audits
        review.picture = audit_picture_view(job)
    for institution in institutions:
        reservation = own.get(institution.pk)
        dataset = datasets.get(institution.pk)
        # With no guarantee at δ (an event without noise) the projection is unbounded, and the
        # page says so, rather than showing nothing.
        projected = (
            epsilon_or_unbounded(events.get(institution.pk, []), delta)
            if delta is not None
            else None
        )
        review.institutions.append(
            InstitutionReview(
                institution=institution,
                dataset=dataset,
                reservation=reservation,
                job_epsilon=reservation.epsilon if reservation else None,
                projected_epsilon=projected,
                cap=cap,
                delta=delta,
                decision=(decisions or {}).get(institution.pk),
                guarantee=_guarantee(spec, reservation, dataset, delta=delta, cap=cap),
                audit=audit_of.get(institution.pk)
                or audit_status(job, institution, None, whose="a record of yours"),
            )
        )
    return review
