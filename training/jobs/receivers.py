"""Reactions to governance signals (connected in ``TrainingConfig.ready``)."""

from consortium.governance.signals import consent_withdrawn
from training.jobs.approvals import jobs_remove_institution


def _remove_from_jobs(sender, *, withdrawal, acting_user, **kwargs):
    """Only the jobs under the agreement withdrawn from: consent to another stands."""
    jobs_remove_institution(
        institution=withdrawal.institution,
        agreement=withdrawal.agreement,
        reason=f"consent withdrawn: {withdrawal.reason}",
        acting_user=acting_user,
    )


def connect() -> None:
    consent_withdrawn.connect(_remove_from_jobs, dispatch_uid="training.remove_from_jobs")
