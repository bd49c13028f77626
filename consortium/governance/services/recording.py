"""The ledger entry of a governance write: the one helper every governance service calls,
inside its own transaction, so the change and its entry commit together or not at all.

The event is one of :mod:`audit.ledger.events`' constants; ``append_entry`` checks the payload
against that event's schema before anything is written.
"""

from __future__ import annotations

from audit.ledger.chain import append_entry
from consortium.governance.models import Consortium


def record_governance_event(
    event: str, *, actor, subject, consortium: Consortium, institution=None, **payload
):
    """Append ``event`` about ``subject`` in ``consortium`` (and ``institution``, when the act
    concerns one); the remaining keyword arguments are the payload."""
    return append_entry(
        event=event,
        actor=actor,
        subject=subject,
        consortium_slug=consortium.slug,
        institution_slug=institution.slug if institution is not None else "",
        payload=payload,
    )


def record_account_event(event: str, *, actor, subject, **payload):
    """Append ``event`` about a person's own account (their API tokens): it belongs to no
    consortium, so the entry names none; it is chained and verified like every other."""
    return append_entry(event=event, actor=actor, subject=subject, payload=payload)
