"""What the proposal form offers before anything is proposed: a starting spec that the agreement
in force accepts, and the privacy budget a spec would spend at each institution.

Both only read. They ask the same questions the services ask when a job is proposed
(:func:`training.jobs.compliance.check_job_compliance`, with its accountant and every live
reservation), so what the form shows is what the proposal will meet: a form pre-filled from
fixed numbers broke any agreement that asked for another mechanism (issue 14, defect 4), and a
projection computed apart from the check could promise a budget the check then refuses.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass, field

from consortium.governance.models import Consortium, DPMechanism
from consortium.governance.selectors import AgreementStatus, agreement_in_force
from training.jobs.accounting import BudgetProjection
from training.jobs.compliance import ComplianceReport, Problem, check_job_compliance
from training.jobs.describe import pipeline_warnings
from training.jobs.guarantees import guarantee_for_events, weak_guarantee_advice
from training.jobs.registry import model_registry
from training.jobs.spec import SpecError, validate_spec
from training.models import SiteDataset

#: The form's plain defaults: what a proposer is offered before choosing otherwise. They are
#: part of the spec checked against the agreement, so they live here with the pipeline.
BASE_SETTINGS = {
    "topology": "fedavg",
    "rounds": 5,
    "local_epochs": 1,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.01, "momentum": 0.9},
    "momentum_restart": True,
    "round_timeout_seconds": 600,
    "approval_ttl_hours": 168,
}

#: Each mechanism's filter at strength 1; a stronger setting divides ε (more noise, or a
#: smaller ε per round). DP-SGD's numbers are the demo's (noise 2.5, gradients clipped at 1).
_BASE_NOISE = {
    DPMechanism.DP_SGD: 2.5,
    DPMechanism.GAUSSIAN: 4.0,
    DPMechanism.NONE: 4.0,  # nothing required: Gaussian noise anyway, it is the safe default
}
_BASE_EPSILON_PER_ROUND = {DPMechanism.LAPLACE: 0.2, DPMechanism.SVT: 0.2}
#: The sparse vector technique's threshold on |change| of one coordinate: above 0, since the
#: value bound (twice the threshold) is derived from it, and of the order of one local epoch's
#: changes at the form's learning rate.
_SVT_THRESHOLD = 0.01

#: Tried in order until every participant's projected ε fits its cap: more noise first (the
#: model still trains as long), then a single round with the most noise.
_ATTEMPTS = ((5, 1.0), (5, 2.0), (5, 4.0), (5, 8.0), (1, 8.0))

#: The share of the model sent when the agreement sets no limit below everything.
_UNLIMITED_SHARE = 1.0


def _noise_filter(mechanism: str, strength: float) -> dict:
    if mechanism == DPMechanism.DP_SGD:
        z = _BASE_NOISE[DPMechanism.DP_SGD] * strength
        return {"filter": "dp_sgd", "noise_multiplier": z, "max_grad_norm": 1.0}
    if mechanism == DPMechanism.LAPLACE:
        epsilon = _BASE_EPSILON_PER_ROUND[DPMechanism.LAPLACE] / strength
        return {"filter": "laplace_noise", "epsilon": epsilon, "sensitivity": 1.0}
    z = _BASE_NOISE[DPMechanism.GAUSSIAN] * strength
    return {"filter": "gaussian_noise", "noise_multiplier": z, "clip_norm": 1.0}


def pipeline_for_terms(*, required_mechanism: str, max_shared_fraction: float, strength=1.0):
    """A privacy pipeline that meets an agreement's privacy floor: its required mechanism
    (Gaussian noise when none is required), at most its share of the model per round, and
    the update clipped at its 95th percentile.

    ``strength`` scales the noise (and divides a pure ε per round) so that a caller can trade
    accuracy for budget without changing the pipeline's shape.
    """
    cap = min(float(max_shared_fraction), _UNLIMITED_SHARE)
    clipping = {"filter": "percentile_clipping", "percentile": 95.0}
    if required_mechanism == DPMechanism.SVT:
        # The sparse vector technique both selects what is shared and spends ε for it, so its
        # fraction is the agreement's share and no partial sharing is needed.
        epsilon = _BASE_EPSILON_PER_ROUND[DPMechanism.SVT] / strength
        return [
            clipping,
            {"filter": "svt", "epsilon": epsilon, "threshold": _SVT_THRESHOLD, "fraction": cap},
        ]
    sharing = (
        [{"filter": "partial_sharing", "fraction": cap, "strategy": "topk"}]
        if cap < _UNLIMITED_SHARE
        else []
    )
    noise = _noise_filter(required_mechanism, strength)
    if required_mechanism == DPMechanism.DP_SGD:
        # DP-SGD acts while the site trains, before the update exists; listed first.
        return [noise, *sharing, clipping]
    return [*sharing, clipping, noise]


@dataclass
class ProposalDefaults:
    """A title and spec to pre-fill the form with, and what the proposer should know about
    them (``notes``: why something could not be filled in; empty when the spec complies)."""

    title: str
    spec: dict
    notes: list[str] = field(default_factory=list)
    complies: bool = False


@dataclass(frozen=True)
class _Offer:
    key: str
    modality: str
    institutions: tuple[str, ...]  # slugs, in name order
    model: str
    purpose: str


def _offers(status: AgreementStatus) -> list[_Offer]:
    """Each data set key the eligible institutions offer, with the first model the agreement
    permits that fits it; the keys offered by most institutions come first."""
    version = status.version
    eligible = status.eligible_institution_ids
    registry = model_registry()
    groups: dict[tuple, list[SiteDataset]] = defaultdict(list)
    for dataset in SiteDataset.objects.filter(institution_id__in=eligible).select_related(
        "institution"
    ):
        shape = (dataset.key, dataset.modality, tuple(dataset.input_shape), dataset.n_classes)
        groups[shape].append(dataset)
    offers = []
    for (key, modality, shape, n_classes), datasets in groups.items():
        for name, model in sorted(registry.items()):
            if (
                model.modality != modality
                or model.family not in version.permitted_model_families
                or model.purpose not in version.permitted_purposes
            ):
                continue
            try:
                model.check_dataset(input_shape=list(shape), n_classes=n_classes, params={})
            except ValueError:
                continue
            institutions = sorted(datasets, key=lambda d: d.institution.name)
            offers.append(
                _Offer(
                    key,
                    modality,
                    tuple(d.institution.slug for d in institutions),
                    name,
                    model.purpose,
                )
            )
            break
    offers.sort(key=lambda o: (-len(o.institutions), o.key))
    return offers


def _spec(offer: _Offer, *, rounds: int, pipeline: list[dict]) -> dict:
    return {
        "purpose": offer.purpose,
        "participants": list(offer.institutions),
        "dataset_key": offer.key,
        "model": {"name": offer.model},
        **BASE_SETTINGS,
        "rounds": rounds,
        "privacy_pipeline": pipeline,
    }


def _title(offer: _Offer) -> str:
    return f"{offer.purpose.capitalize()} of {offer.key} ({offer.model})"


def proposal_defaults(*, consortium: Consortium) -> ProposalDefaults:
    """The spec the proposal form starts from: one that the agreement in force accepts as it is.

    Participants are the institutions that signed the agreement's current version and have not
    withdrawn, among them those offering the data set most of them offer; the model is the first
    registered one the agreement permits that fits that data set; the pipeline meets the
    agreement's privacy floor (:func:`pipeline_for_terms`), with as much noise as it takes for
    every participant's projected ε (past jobs included) to fit the cap. Where no spec can
    comply, the closest one is returned with ``notes`` saying what stands in the way.
    """
    status = agreement_in_force(consortium)
    if status is None:
        return ProposalDefaults(
            title="",
            spec={
                **BASE_SETTINGS,
                "participants": [],
                "privacy_pipeline": pipeline_for_terms(
                    required_mechanism=DPMechanism.GAUSSIAN, max_shared_fraction=0.4
                ),
            },
            notes=[
                f"No data-use agreement is in force in {consortium}: a job can be saved as a "
                "draft, but none can be proposed until an agreement is published and signed."
            ],
        )
    version = status.version
    offers = _offers(status)
    if not offers:
        return ProposalDefaults(
            title="",
            spec={
                **BASE_SETTINGS,
                "participants": [],
                "privacy_pipeline": pipeline_for_terms(
                    required_mechanism=version.required_dp_mechanism,
                    max_shared_fraction=version.max_shared_fraction,
                ),
            },
            notes=[
                "No institution that signed the agreement offers a data set that a model the "
                "agreement permits can train on: a data steward registers one first."
            ],
        )
    offer = offers[0]
    spec: dict = {}
    report = None
    for rounds, strength in _ATTEMPTS:
        pipeline = pipeline_for_terms(
            required_mechanism=version.required_dp_mechanism,
            max_shared_fraction=version.max_shared_fraction,
            strength=strength,
        )
        spec = _spec(offer, rounds=rounds, pipeline=pipeline)
        if version.privacy_audit_required:
            # The agreement requires each site's audit before approval: start from a job
            # that asks for it (at the default records and seed).
            spec["privacy_audit"] = {}
        try:
            normalised = validate_spec(spec)
        except SpecError as exc:  # e.g. a registered model whose defaults do not validate
            return ProposalDefaults(title=_title(offer), spec=spec, notes=[str(exc)])
        report = check_job_compliance(consortium=consortium, spec=normalised)
        if report.ok:
            return ProposalDefaults(title=_title(offer), spec=spec, complies=True)
    notes = [p.message for p in report.problems] if report else []
    return ProposalDefaults(title=_title(offer), spec=spec, notes=notes)


@dataclass
class BudgetPreview:
    """What proposing a spec would meet: each participant's budget and every problem the
    compliance check finds (``spec_errors`` when the spec itself is not valid yet)."""

    #: One projection per participant, named by the institution's name (not its slug).
    rows: list[BudgetProjection] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    spec_errors: list[str] = field(default_factory=list)
    #: What the pipeline does that its numbers hide (:func:`training.jobs.describe.
    #: pipeline_warnings`): not problems, the job may still be proposed.
    advice: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.problems or self.spec_errors)


def _rows(report: ComplianceReport) -> list[BudgetProjection]:
    rows = []
    for slug, projection in report.projections.items():
        institution = report.institutions.get(slug)
        name = institution.name if institution else slug
        rows.append(dataclasses.replace(projection, institution=name))
    return sorted(rows, key=lambda r: r.institution)


def proposal_budget_preview(
    *, consortium: Consortium, spec: dict, exclude_job_id: int | None = None
) -> BudgetPreview:
    """The projected ε of ``spec`` at each participant against its cap, and every way it
    breaks the agreement, from the very check :func:`training.jobs.proposals.job_propose` runs
    (``exclude_job_id``: a job being edited, whose own reservation would be replaced)."""
    try:
        normalised = validate_spec(spec)
    except SpecError as exc:
        return BudgetPreview(
            spec_errors=[
                msg if path == "$" else f"{path}: {msg}" for path, msg in exc.errors.items()
            ]
        )
    report = check_job_compliance(
        consortium=consortium, spec=normalised, exclude_job_id=exclude_job_id
    )
    return BudgetPreview(
        rows=_rows(report),
        problems=list(report.problems),
        advice=pipeline_warnings(normalised) + _guarantee_advice(report),
    )


def _guarantee_advice(report: ComplianceReport) -> list[str]:
    """The weak-guarantee (or no-mechanism) sentence of :mod:`training.jobs.guarantees`, from
    the events the check projected at each participant, at the agreement's δ."""
    if report.version is None:
        return []
    delta = float(report.version.delta)
    guarantees = {}
    for slug, events in report.job_events.items():
        institution = report.institutions.get(slug)
        guarantees[institution.name if institution else slug] = guarantee_for_events(
            events, delta=delta
        )
    return weak_guarantee_advice(guarantees)
