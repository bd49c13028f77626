"""Withdrawal of consent: an institution leaves an agreement and takes part in no future job
under it.

Consent is given per agreement, so it is withdrawn per agreement: the institution stays in the
jobs that run under another agreement it still consents to. The training app removes it from
the unfinished jobs under this agreement (any of its versions) through the ``consent_withdrawn``
signal (``training.jobs.receivers``), so governance does not import training.
"""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from audit.ledger import events as ledger_events
from consortium.core.errors import ConflictError, ServiceError
from consortium.governance.models import Agreement, Institution, Withdrawal
from consortium.governance.services.recording import record_governance_event
from consortium.governance.signals import consent_withdrawn


def consent_withdraw(
    *, acting_user, agreement: Agreement, institution: Institution, reason: str
) -> Withdrawal:
    """Withdraw an institution's consent under ``agreement``: it takes part in no future job
    under that agreement and leaves the unfinished ones (the signal's receiver)."""
    reason = (reason or "").strip()
    if len(reason) < 10:
        raise ValidationError(
            {
                "reason": "Give the reason for withdrawing (at least 10 characters); it is "
                "recorded in the ledger."
            }
        )
    if institution.consortium_id != agreement.consortium_id:
        raise ServiceError(f"{institution} is not a member of {agreement.consortium}.")
    with transaction.atomic():
        if Withdrawal.objects.filter(agreement=agreement, institution=institution).exists():
            raise ConflictError(
                f"{institution} has already withdrawn its consent.", code="already_withdrawn"
            )
        withdrawal = Withdrawal.objects.create(
            agreement=agreement,
            institution=institution,
            reason=reason,
            withdrawn_by=acting_user,
            withdrawn_by_repr=acting_user.get_full_name() or acting_user.get_username(),
        )
        record_governance_event(
            ledger_events.CONSENT_WITHDRAWN,
            actor=acting_user,
            subject=withdrawal,
            consortium=agreement.consortium,
            institution=institution,
            agreement_id=agreement.pk,
            reason=reason,
        )
        consent_withdrawn.send(sender=Withdrawal, withdrawal=withdrawal, acting_user=acting_user)
    return withdrawal
