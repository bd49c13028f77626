"""A round's lease: how a process that works on a round says it is still alive.

``Round.claim_token`` and ``Round.lease_expires_at`` are one lease, held by one worker at a
time: the coordinator while it aggregates and closes a round (``training.rounds.coordinator``),
then the scoring worker while it scores the closed round (``training.rounds.scoring_queue``).
The holder renews the expiry from a thread (:class:`RoundLease`) every third of
``FL_CLAIM_LEASE_SECONDS``; a holder that dies stops renewing, the lease runs out within that
time, and the periodic tick hands the round on (claims it again, or sends it to be scored
again). Correctness never rests on the lease: every move it guards is a compare-and-set on the
token, so a holder paused past its lease changes nothing once another took over. The lease
only bounds how long a dead holder keeps a round waiting.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import threading

from django.conf import settings
from django.db import DatabaseError, connection
from django.utils import timezone

from training.models import Round

log = logging.getLogger(__name__)

__all__ = ["RoundLease", "lease_length", "new_token"]


def new_token() -> str:
    """A fresh claim token (32 hex digits, ``Round.claim_token``'s length)."""
    return secrets.token_hex(16)


def lease_length() -> dt.timedelta:
    """How long a lease lasts unrenewed (``FL_CLAIM_LEASE_SECONDS``)."""
    return dt.timedelta(seconds=getattr(settings, "FL_CLAIM_LEASE_SECONDS", 30))


class RoundLease:
    """Renews the lease of ``token`` on a round from a thread while the block runs: a long
    aggregation or scoring keeps its round, a killed one loses it within
    ``FL_CLAIM_LEASE_SECONDS``. Renewal stops by itself once the token is no longer the
    round's (the holder handed the round on, or another took it over)."""

    def __init__(self, round_id: int, token: str):
        self.round_id = round_id
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._renew, name=f"lease-round-{round_id}", daemon=True
        )

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=10)
        return False

    def _renew(self) -> None:
        every = max(1.0, lease_length().total_seconds() / 3)
        try:
            while not self._stop.wait(every):
                try:
                    self._renew_once()
                except DatabaseError:
                    log.warning("could not renew the lease of round #%s", self.round_id)
                    connection.close()
        finally:
            connection.close()

    def _renew_once(self) -> bool:
        # Aggregating (the coordinator), and once closed, scoring (the scoring worker).
        return bool(
            Round.objects.filter(
                pk=self.round_id,
                state__in=(Round.State.AGGREGATING, Round.State.CLOSED),
                claim_token=self.token,
                lease_expires_at__isnull=False,
            ).update(lease_expires_at=timezone.now() + lease_length())
        )
