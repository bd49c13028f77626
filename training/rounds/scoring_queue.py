"""Contribution scoring off the rounds' critical path: the ``scoring`` queue and how a round
gets there (docs/architecture.md, section 8).

Scoring a round evaluates up to a few hundred coalition models, more than the round itself
costs. Run by the coordinator after each close, it held the coordinator's worker, and under
load the next round's close waited behind it: the slow rounds were exactly those after a scored
one. So a closed round is scored by a worker of its own (``celery -A consortium worker -Q
scoring``, ``fl-scoring.service``), from the ``training.round_score`` message
(:data:`training.queues.ROUND_SCORE`); the coordinator only sends it.

How a round reaches the scoring worker, and why it is scored even when a message or a worker is
lost. The round's lease (``claim_token``, ``lease_expires_at``: :mod:`training.rounds.leases`),
which the coordinator holds while it closes the round, passes on:

1. **queued**: the move that calls for scoring (the round's close; for a job evaluated at the
   sites, the close of their evaluation) calls :func:`scoring_send` in its own transaction: the
   message goes to the outbox (``training.outbox``: published when the move commits, by the
   relay if the broker does not take it), and the round is marked queued, an empty
   ``claim_token`` with a lease until ``FL_REDISPATCH_AFTER_SECONDS`` from now (how long a
   message may wait before it is taken for lost, as for a site's task);
2. **scoring**: the task takes the round (:func:`scoring_claim`, a compare-and-set) when it is
   queued or its lease ran out, under a fresh token whose lease it renews while it scores
   (``FL_CLAIM_LEASE_SECONDS``); another message for the same round (a second delivery, an
   early re-send) finds the round recorded and does nothing, or its lease held and leaves it
   to the holder;
3. **done**: the scorer lets the lease go (:func:`scoring_release`) once the round is recorded
   (or the sites are asked to evaluate it; their evaluation's close sends it again).

The periodic tick (``training.rounds.contributions.rescore_missing``, on ``central``) never
scores: it sends the round again (:func:`scoring_resend`) when it is closed, unrecorded and its
lease ran out, which is what a message lost with the broker or a scoring worker killed
mid-round (its lease, no longer renewed, runs out within ``FL_CLAIM_LEASE_SECONDS``) leave
behind. Never while the lease is held: a scoring worker busy with a round renews its lease, so
that round is not sent again, and each re-send takes the queued lease for as long as the round
has already waited (``FL_REDISPATCH_AFTER_SECONDS`` at least), so a round that waits behind a
long backlog, or for a scoring worker that is down, is sent again after 1, 2, 4... times that
wait, not at every tick. A message sent twice costs its worker one ledger look-up; recording
is checked under the ledger's lock, so a round is recorded once whoever scores it.
"""

from __future__ import annotations

import datetime as dt

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from training import outbox, queues
from training.models import Round
from training.rounds.leases import lease_length, new_token

__all__ = [
    "resend_after",
    "scoring_claim",
    "scoring_release",
    "scoring_resend",
    "scoring_send",
]


def resend_after() -> dt.timedelta:
    """How long a scoring message may wait before the tick takes it for lost
    (``FL_REDISPATCH_AFTER_SECONDS``, the site tasks' setting: the same question)."""
    return dt.timedelta(seconds=getattr(settings, "FL_REDISPATCH_AFTER_SECONDS", 300))


def scoring_send(round_id: int, *, now: dt.datetime | None = None) -> None:
    """Send a closed round to the scoring queue, in the caller's transaction (the move that
    closed the round or its evaluation): the message in the outbox, the round marked queued.
    Whoever held the round's lease lets it go here."""
    now = now or timezone.now()
    Round.objects.filter(pk=round_id).update(claim_token="", lease_expires_at=now + resend_after())
    outbox.send_after_commit(queues.ROUND_SCORE, args=[round_id])


def scoring_claim(round_id: int, *, now: dt.datetime | None = None) -> str | None:
    """Take a closed round for scoring: a compare-and-set that succeeds when the round is
    queued (an empty token) or its lease ran out (the scorer before died). Returns the new
    token, whose lease the caller renews while it scores, or None when another scorer holds
    the round."""
    now = now or timezone.now()
    token = new_token()
    taken = (
        Round.objects.filter(pk=round_id, state=Round.State.CLOSED)
        .filter(Q(claim_token="") | Q(lease_expires_at__isnull=True) | Q(lease_expires_at__lte=now))
        .update(claim_token=token, lease_expires_at=now + lease_length())
    )
    return token if taken else None


def scoring_release(round_id: int, token: str) -> None:
    """The scorer is done with the round: its lease is cleared (a no-op once the token is no
    longer the round's)."""
    Round.objects.filter(pk=round_id, claim_token=token).update(lease_expires_at=None)


def scoring_resend(round_id: int, *, now: dt.datetime) -> bool:
    """Send a closed round to the scoring queue again if its lease ran out (or was let go):
    a compare-and-set on the lease as it was read, so of two ticks only one sends, and the
    queued lease it takes lasts as long as the round has waited since its close, at least
    :func:`resend_after` (back-off: see the module docstring). Returns whether it sent."""
    row = (
        Round.objects.filter(pk=round_id, state=Round.State.CLOSED)
        .values("claim_token", "lease_expires_at", "closed_at")
        .first()
    )
    if row is None or (row["lease_expires_at"] is not None and row["lease_expires_at"] > now):
        return False
    waited = now - row["closed_at"] if row["closed_at"] is not None else dt.timedelta(0)
    with transaction.atomic():
        moved = Round.objects.filter(
            pk=round_id,
            state=Round.State.CLOSED,
            claim_token=row["claim_token"],
            lease_expires_at=row["lease_expires_at"],
        ).update(claim_token="", lease_expires_at=now + max(resend_after(), waited))
        if not moved:
            return False
        outbox.send_after_commit(queues.ROUND_SCORE, args=[round_id])
    return True
