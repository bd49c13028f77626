"""Does a job fit the agreement in force and every participant's privacy budget?

Checked when a job is proposed or its spec changes, and again when an approver
decides under a newer agreement version. A refusal names the term and the
institution, so the proposer knows exactly what to change (docs/architecture.md, section 4,
step 1). This module only reads; ``training.jobs.proposals`` reserves the budget in
the same transaction as the check.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from consortium.core.errors import ConflictError
from consortium.governance.models import Consortium, DPMechanism, Institution
from consortium.governance.selectors import AgreementStatus, agreement_in_force, agreement_status
from training.fl.holdout import BUNDLED_DATASETS
from training.jobs import central_validation
from training.jobs.accounting import (
    BudgetProjection,
    PrivacyEvent,
    events_for_pipeline,
    project_budget,
)
from training.jobs.registry import model_registry
from training.jobs.selectors import committed_privacy_events
from training.jobs.spec import (
    EVALUATION_CENTRAL,
    dp_mechanisms,
    evaluation_settings,
    privacy_audit_settings,
    shared_fraction,
    training_records,
)
from training.models import SiteDataset


@dataclass(frozen=True)
class Problem:
    """One way a job breaks the agreement: which term, which institution, why."""

    term: str
    message: str
    institution: str = ""

    def to_json(self) -> dict:
        return {"term": self.term, "institution": self.institution, "message": self.message}


@dataclass
class ComplianceReport:
    status: AgreementStatus | None
    problems: list[Problem] = field(default_factory=list)
    projections: dict[str, BudgetProjection] = field(default_factory=dict)
    job_events: dict[str, list[PrivacyEvent]] = field(default_factory=dict)
    institutions: dict[str, Institution] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def version(self):
        return self.status.version if self.status else None

    def add(self, term: str, message: str, institution: str = "") -> None:
        self.problems.append(Problem(term, message, institution))


class ComplianceError(ConflictError):
    """The job breaks the agreement or a budget; ``problems`` says how."""

    code = "not_compliant"

    def __init__(self, report: ComplianceReport):
        self.report = report
        self.problems = report.problems
        super().__init__("; ".join(p.message.rstrip(".") for p in report.problems) + ".")


def _pct(value: float) -> str:
    return f"{value * 100:.0f}%"


def _check_participants(
    report: ComplianceReport, consortium: Consortium, slugs: list[str], status: AgreementStatus
) -> dict[str, Institution]:
    """Each participant is an institution of the consortium, has signed the
    agreement's current version and has not withdrawn."""
    version = status.version
    institutions = {i.slug: i for i in consortium.institutions.filter(slug__in=slugs)}
    withdrawn = {w.institution_id for w in status.withdrawn}
    signed = {s.institution_id for s in status.signed}
    for slug in slugs:
        institution = institutions.get(slug)
        if institution is None:
            report.add("participants", f"'{slug}' is not an institution of {consortium}.", slug)
        elif institution.pk in withdrawn:
            report.add(
                "withdrawn",
                f"{institution} has withdrawn its consent and takes part in no new job.",
                slug,
            )
        elif institution.pk not in signed:
            report.add(
                "signature",
                f"{institution} has not signed version {version.number} of the agreement.",
                slug,
            )
    return institutions


def _check_central_validation(report, consortium, spec, version, datasets) -> None:
    """A job evaluated centrally on a data set that is not bundled needs the consortium's
    central validation set for its key, allowed by the agreement in force and fitting the
    participants' data sets (``training.jobs.central_validation``)."""
    key = spec["dataset_key"]
    if evaluation_settings(spec)["where"] != EVALUATION_CENTRAL or key in BUNDLED_DATASETS:
        return
    term = central_validation.TERM
    if not version.allows_central_validation_set:
        report.add(
            term,
            f"The job evaluates its models centrally, but version {version.number} of the "
            f"agreement does not allow a central validation set (the term "
            f"“{central_validation.TERM_WORDS}”), so the consortium holds none for '{key}': "
            'evaluate at the sites ({"where": "sites"}) or amend the agreement.',
        )
        return
    held = central_validation.validation_set_current(consortium.pk, key)
    if held is None:
        report.add(
            term,
            f"The job evaluates its models centrally, but no central validation set for '{key}' "
            f"has been uploaded in {consortium}: a data steward uploads one from the data sets "
            'page, or evaluate at the sites ({"where": "sites"}).',
        )
        return
    for problem in central_validation.fit_problems(
        modality=held.modality,
        input_shape=held.input_shape,
        n_classes=held.n_classes,
        datasets=datasets,
    ):
        report.add(
            term,
            f"The central validation set for '{key}' (uploaded by {held.institution}) does not "
            f"fit the job's data: {problem}.",
        )


def check_job_compliance(
    *, consortium: Consortium, spec: dict, exclude_job_id: int | None = None
) -> ComplianceReport:
    """Check a validated spec against the agreement in force and the budgets.

    ``exclude_job_id`` leaves that job's own reservations out of what is already
    spent (when a job's spec changes, its old reservation is replaced).
    """
    status = agreement_in_force(consortium)
    report = ComplianceReport(status=status)
    if status is None:
        reasons = []
        latest = None  # the newest agreement with a published version
        for agreement in consortium.agreements.order_by("-created_at"):
            agreement_state = agreement_status(agreement)
            reasons.extend(agreement_state.reasons)
            if latest is None and agreement_state.version is not None:
                latest = agreement_state
        detail = f" ({'; '.join(reasons)})" if reasons else ""
        report.add("agreement", f"No data-use agreement is in force in {consortium}{detail}.")
        if latest is not None:
            # Also name the participants who hold it up (typically an amendment they
            # have not signed yet), so the refusal says which institution to ask.
            _check_participants(report, consortium, spec["participants"], latest)
        return report
    version = status.version

    # Participants: members, signed, not withdrawn.
    institutions = _check_participants(report, consortium, spec["participants"], status)
    report.institutions = institutions

    # Purpose, model family, privacy floor.
    if spec["purpose"] not in version.permitted_purposes:
        report.add(
            "purpose",
            f"The agreement permits {', '.join(version.permitted_purposes)} jobs, "
            f"not {spec['purpose']}.",
        )
    registry = model_registry()
    model = registry[spec["model"]["name"]]
    if model.family not in version.permitted_model_families:
        report.add(
            "model_family",
            f"The model {model.name} is of the {model.family} family; the agreement permits "
            f"only {', '.join(version.permitted_model_families)}.",
        )
    fraction = shared_fraction(spec)
    cap = float(version.max_shared_fraction)
    if fraction > cap + 1e-12:
        report.add(
            "shared_fraction",
            f"Each site would share {_pct(fraction)} of the model per round; the agreement "
            f"allows at most {_pct(cap)} (add or lower a partial_sharing filter).",
        )
    required = version.required_dp_mechanism
    if required != DPMechanism.NONE and required not in dp_mechanisms(spec):
        report.add(
            "dp_mechanism",
            f"The agreement requires {DPMechanism(required).label} in every site's privacy "
            "pipeline, and this job's pipeline has none.",
        )
    if version.privacy_audit_required and privacy_audit_settings(spec) is None:
        # Checked again at each institution's approval (training.jobs.audit_gate): there its
        # own audit must be in, and within the agreement's maxima.
        report.add(
            "privacy_audit",
            "The agreement requires each site's privacy audit before approval: ask for it in "
            "the proposal (privacy_audit).",
        )

    # Data sets: every participant offers the key, with one shape the model takes.
    datasets = {
        d.institution.slug: d
        for d in SiteDataset.objects.filter(
            institution__in=institutions.values(), key=spec["dataset_key"]
        ).select_related("institution")
    }
    shapes = set()
    for slug, institution in institutions.items():
        dataset = datasets.get(slug)
        if dataset is None:
            report.add(
                "dataset",
                f"{institution} offers no data set with the key '{spec['dataset_key']}'.",
                slug,
            )
            continue
        if dataset.modality != model.modality:
            report.add(
                "dataset",
                f"{institution}'s '{dataset.key}' holds {dataset.get_modality_display().lower()}; "
                f"the model {model.name} takes {model.modality} data.",
                slug,
            )
            continue
        try:
            model.check_dataset(
                input_shape=list(dataset.input_shape),
                n_classes=dataset.n_classes,
                params=spec["model"].get("params", {}),
            )
        except ValueError as exc:
            report.add("dataset", f"{institution}'s '{dataset.key}': {exc}", slug)
        shapes.add((json.dumps(dataset.input_shape), dataset.n_classes))
    if len(shapes) > 1:
        report.add(
            "dataset",
            f"The participants' '{spec['dataset_key']}' data sets differ in shape or number "
            "of classes, so one model cannot fit them all.",
        )
    _check_central_validation(report, consortium, spec, version, datasets.values())

    # Budgets: replay every live reservation, add this job, compare with the cap.
    delta = float(version.delta)
    eps_cap = float(version.epsilon_cap)
    past_events = committed_privacy_events(
        [i.pk for i in institutions.values()], exclude_job_id=exclude_job_id
    )
    for slug, dataset in datasets.items():
        institution = institutions[slug]
        events = events_for_pipeline(
            spec["privacy_pipeline"],
            rounds=spec["rounds"],
            local_epochs=spec["local_epochs"],
            batch_size=spec["batch_size"],
            num_records=training_records(dataset.num_records, spec),
        )
        report.job_events[slug] = events
        projection = project_budget(
            institution=institution.name,
            past_events=past_events.get(institution.pk, []),
            job_events=events,
            cap=eps_cap,
            delta=delta,
        )
        report.projections[slug] = projection
        if not projection.fits:
            report.add("budget", projection.explain(), slug)
    return report
