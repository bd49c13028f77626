"""Access rules for training jobs and site data sets (``rules`` predicates over
the memberships computed in ``consortium.governance.permissions``)."""

from __future__ import annotations

import rules

from consortium.governance.models import FinalModelAccess, Role
from consortium.governance.permissions import (
    grants_of,
    is_consortium_admin,
    is_consortium_member,
    is_data_steward,
    is_institution_admin,
)


@rules.predicate
def is_researcher_in_consortium(user, obj) -> bool:
    """A researcher at any institution of the object's consortium."""
    cid = getattr(obj, "consortium_id", None) or getattr(obj, "pk", None)
    return any(g.consortium_id == cid and g.role == Role.RESEARCHER for g in grants_of(user))


@rules.predicate
def is_proposer(user, job) -> bool:
    return job is not None and user.is_authenticated and job.proposer_id == user.pk


@rules.predicate
def approves_for_a_participant(user, job) -> bool:
    """The user is an approver of an institution taking part in the job."""
    if job is None:
        return False
    ids = job_participant_ids(job)
    return any(g.institution_id in ids and g.role == Role.APPROVER for g in grants_of(user))


def job_participant_ids(job) -> set[int]:
    cached = getattr(job, "_participant_ids", None)
    if cached is None:
        cached = set(job.participants.values_list("institution_id", flat=True))
        job._participant_ids = cached
    return cached


# Jobs: obj is the consortium for proposing, the job otherwise.
rules.add_perm("training.propose_job", is_consortium_admin | is_researcher_in_consortium)
rules.add_perm("training.view_job", is_consortium_member)
rules.add_perm("training.change_job", is_consortium_admin | is_proposer)
rules.add_perm("training.cancel_job", is_consortium_admin | is_proposer)
rules.add_perm("training.decide_job", approves_for_a_participant)


@rules.predicate
def is_member_of_an_active_participant(user, job) -> bool:
    """The user holds a role at an institution still taking part in the job (a withdrawn
    institution's members are not: the agreement's consent no longer covers them)."""
    if job is None:
        return False
    active = {p.institution_id for p in job.participants.all() if p.status == p.Status.ACTIVE}
    return any(g.institution_id in active for g in grants_of(user))


def final_model_access(job) -> str:
    """The term ``final_model_access`` of the agreement version the job runs under: who may
    take its models away. A job bound to no version yet (a draft: it has no model) reads the
    term's default, which is the rule from before agreements had the term."""
    version = job.agreement_version if job.agreement_version_id else None
    if version is None:
        return FinalModelAccess.PARTICIPANTS_AND_ADMINS
    return version.final_model_access


@rules.predicate
def agreement_lets_participants_download(user, job) -> bool:
    return job is not None and final_model_access(job) != FinalModelAccess.NOBODY


@rules.predicate
def agreement_lets_admins_download(user, job) -> bool:
    return job is not None and final_model_access(job) == FinalModelAccess.PARTICIPANTS_AND_ADMINS


# A job's global models (obj is the job): the agreement's term ``final_model_access`` says who
# may take one away. At most those who built it (the members of the institutions still taking
# part) and, when the term says so, the consortium's admins, who answer for the agreement;
# nobody when the term keeps the models on the consortium's server. Never the other
# institutions of the consortium, who only see the job.
rules.add_perm(
    "training.download_model",
    (is_member_of_an_active_participant & agreement_lets_participants_download)
    | (is_consortium_admin & agreement_lets_admins_download),
)

# Site data sets: obj is the institution.
rules.add_perm("training.view_datasets", is_consortium_member)
rules.add_perm("training.manage_datasets", is_data_steward | is_institution_admin)


@rules.predicate
def is_member_of_dataset_consortium(user, dataset) -> bool:
    """For one data set (obj is the ``SiteDataset``): a member of its institution's consortium."""
    return dataset is not None and is_consortium_member(user, dataset.institution)


# One data set, for the API's retrieve (obj is the SiteDataset; manage_datasets also
# accepts it, since the institution predicates read its institution_id).
rules.add_perm("training.view_dataset", is_member_of_dataset_consortium)

# Central validation sets (records sent to the consortium's server, when the agreement allows
# it): obj is the institution. Only its data stewards, who know what the records are.
rules.add_perm("training.upload_validation_set", is_data_steward)

# Site worker credentials (API token and signing key): obj is the institution. Only the
# people who run the site's worker create and revoke them, not the consortium's admins.
rules.add_perm("training.manage_site_credentials", is_data_steward | is_institution_admin)
