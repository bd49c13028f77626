"""Central validation sets: may the consortium hold one, which one a job is measured on, and
does it fit the data sets the sites registered (reads only).

A job evaluated ``central``ly (``training.jobs.spec.evaluation_settings``) is measured on a
validation set the consortium holds: the bundled demo sets carry their own, and for any other
key an institution's data steward may upload one (``training.rounds.validation_sets``) when
the agreement in force allows it (``AgreementVersion.allows_central_validation_set``). The
compliance check (``training.jobs.compliance``) refuses a central job on a key without one;
the coordinator and the contribution scorer load the one :func:`validation_set_in_use`
names.

Which set: the newest uploaded for the consortium and key that the job's agreement may use.
A withdrawal of consent is made under one agreement (``Withdrawal.agreement``), and it reaches
only that agreement's use of the institution's records: a set is left out when its uploader
has withdrawn under the agreement the set was given under (``agreement_version.agreement``:
its records are no longer used at all), or under the agreement of the job it would measure
(the institution takes no part in that agreement's jobs any more). A withdrawal from another,
unrelated agreement of the consortium leaves the set in use. For a job that has started, the
newest uploaded *before* it started (its first round opened): a replacement uploaded mid-job
does not change how the job's rounds are measured.

Why per agreement and not per job: the consortium holds one current set per key
(``CentralValidationSet``'s ``one_current_validation_set``), shared by every job on that key,
and each set records the agreement version that allowed it. The scope is therefore decided
when a job reads the sets (:func:`usable_validation_sets` with the job's agreement), not by
keeping a set per agreement.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from django.db.models import Exists, OuterRef, QuerySet

from consortium.governance.models import AgreementVersion, Consortium, Withdrawal
from consortium.governance.selectors import agreement_in_force, consortium_ids_of
from training.jobs.spec import EVALUATION_CENTRAL, evaluation_settings
from training.models import CentralValidationSet, Round, SiteDataset, TrainingJob

#: What the compliance check calls the agreement's term (``ComplianceReport`` problems).
TERM = "central_validation_set"
TERM_WORDS = "allows a central validation set"


def allowing_version(consortium: Consortium) -> tuple[AgreementVersion | None, str]:
    """``(version, "")`` when the agreement in force allows a central validation set, else
    ``(None, why not)`` in words that name the term."""
    status = agreement_in_force(consortium)
    if status is None:
        return None, f"no data-use agreement is in force in {consortium}"
    version = status.version
    if not version.allows_central_validation_set:
        return None, (
            f"version {version.number} of the agreement in force (“{status.agreement}”) does "
            f"not allow a central validation set (the term “{TERM_WORDS}”): no record may be "
            "sent to the consortium's server"
        )
    return version, ""


def usable_validation_sets(
    consortium_id: int, key: str, *, agreement_id: int | None
) -> QuerySet[CentralValidationSet]:
    """The consortium's sets for ``key`` that a job under ``agreement_id`` may be measured on,
    newest first: without a set whose uploader has withdrawn its consent under the agreement
    the set was given under, or under ``agreement_id`` (``None``: no agreement in force, so
    only the first test applies). A withdrawal under any other agreement does not count."""
    withdrawn_from_own = Withdrawal.objects.filter(
        agreement_id=OuterRef("agreement_version__agreement_id"),
        institution_id=OuterRef("institution_id"),
    )
    sets = CentralValidationSet.objects.filter(consortium_id=consortium_id, key=key).exclude(
        Exists(withdrawn_from_own)
    )
    if agreement_id is not None:
        withdrawn_from_job = Withdrawal.objects.filter(agreement_id=agreement_id).values(
            "institution_id"
        )
        sets = sets.exclude(institution_id__in=withdrawn_from_job)
    return sets.select_related("institution").order_by("-created_at", "-pk")


def _agreement_in_force_id(consortium_id: int) -> int | None:
    status = agreement_in_force(Consortium.objects.get(pk=consortium_id))
    return status.agreement.pk if status is not None else None


def validation_set_current(
    consortium_id: int,
    key: str,
    *,
    at: dt.datetime | None = None,
    agreement_id: int | None = None,
) -> CentralValidationSet | None:
    """The set a job on ``key`` under ``agreement_id`` is measured on: the newest usable one
    (uploaded by ``at``). Without ``agreement_id``, for a job proposed now: under the
    consortium's agreement in force (what the compliance check and the steward's page ask)."""
    if agreement_id is None:
        agreement_id = _agreement_in_force_id(consortium_id)
    sets = usable_validation_sets(consortium_id, key, agreement_id=agreement_id)
    if at is not None:
        sets = sets.filter(created_at__lte=at)
    return sets.first()


def validation_set_in_use(job: TrainingJob) -> CentralValidationSet | None:
    """The uploaded set a job evaluated centrally is (or will be) measured on: the newest set
    its agreement may use when it started, or now if it has not. ``None`` for a job evaluated
    at the sites, or when no set was uploaded (a bundled key then uses its bundled set)."""
    spec = job.spec
    if evaluation_settings(spec)["where"] != EVALUATION_CENTRAL:
        return None
    started = (
        Round.objects.filter(job_id=job.pk, index=1).values_list("opened_at", flat=True).first()
    )
    # A draft has no agreement yet: it would be proposed under the one in force (None).
    agreement_id = (
        AgreementVersion.objects.filter(pk=job.agreement_version_id)
        .values_list("agreement_id", flat=True)
        .first()
    )
    return validation_set_current(
        job.consortium_id, spec["dataset_key"], at=started, agreement_id=agreement_id
    )


def fit_problems(
    *, modality: str, input_shape: list[int], n_classes: int, datasets: Iterable[SiteDataset]
) -> list[str]:
    """How a validation set's records fail to fit the data sets the sites registered under its
    key (each named): the same modality and shape of one record, and labels within the classes
    the job's model is built for."""
    problems = []
    for dataset in datasets:
        where = f"{dataset.institution}'s '{dataset.key}'"
        if dataset.modality != modality:
            problems.append(
                f"{where} holds {dataset.get_modality_display().lower()}, the validation set "
                f"holds {modality} records"
            )
        elif list(dataset.input_shape) != list(input_shape):
            problems.append(
                f"{where} has records of shape {list(dataset.input_shape)}, the validation "
                f"set's are {list(input_shape)}"
            )
        elif n_classes > dataset.n_classes:
            problems.append(
                f"{where} has {dataset.n_classes} classes (labels 0 to {dataset.n_classes - 1}), "
                f"the validation set has labels up to {n_classes - 1}"
            )
    return problems


def uploaded_summary(job: TrainingJob) -> tuple[str, int] | None:
    """``(institution, records)`` of the uploaded set the job is measured on, for the plain
    words of ``training.jobs.describe.describe_evaluation``; ``None`` when there is none."""
    held = validation_set_in_use(job)
    return (held.institution.name, held.num_records) if held is not None else None


def validation_sets_visible_to(user) -> QuerySet[CentralValidationSet]:
    """Every member of a consortium sees which validation sets it holds (not their records)."""
    return CentralValidationSet.objects.filter(
        consortium_id__in=consortium_ids_of(user)
    ).select_related("consortium", "institution", "agreement_version")
