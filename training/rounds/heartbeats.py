"""Whether each site's worker is online: its heartbeats (the write) and what the pages read.

A site worker reports at start and then every ``SITE_HEARTBEAT_SECONDS`` (``POST
/api/site/v1/heartbeat/``, from a thread of its own: ``training.site.heartbeat``), with its
release, the site protocol it speaks, the device it trains on and its host. One row per
credential (:class:`~training.models.SiteWorkerStatus`) holds the latest report, overwritten in
place: this is operational state, not a governance act, so it is written in no ledger (the
credential's creation and revocation are).

A worker is *online* while its last report is at most :data:`MISSED_BEATS` of its own intervals
old: one lost request or a slow one does not flip it, a stopped worker shows offline within
a couple of minutes at the default interval. A revoked credential's worker is not listed: it
is refused anyway. The institution's page, the consortium dashboard and a job's review page
read :func:`site_workers`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.utils import timezone

from training.models import SiteCredential, SiteWorkerStatus

__all__ = [
    "MISSED_BEATS",
    "SiteWorkers",
    "WorkerState",
    "online_window",
    "site_workers",
    "worker_heartbeat_record",
]

#: A worker is shown offline once this many of its intervals pass without a heartbeat.
MISSED_BEATS = 3


def online_window(interval_seconds: float) -> dt.timedelta:
    """How long after a heartbeat its worker still counts as online."""
    return dt.timedelta(seconds=MISSED_BEATS * float(interval_seconds))


# --- The write ------------------------------------------------------------------------------


def worker_heartbeat_record(
    *,
    credential: SiteCredential,
    protocol: int,
    version: str,
    device: str,
    interval_seconds: int,
    hostname: str = "",
    uptime_seconds: float = 0.0,
) -> SiteWorkerStatus:
    """Record that ``credential``'s worker is online now (the site API's heartbeat; the
    request was authenticated by the credential's token, which is the actor). ``started_at``
    is the worker process's start, from its uptime, by this server's clock (a site's clock
    may be off)."""
    now = timezone.now()
    status, _created = SiteWorkerStatus.objects.update_or_create(
        credential=credential,
        defaults={
            "last_seen_at": now,
            "started_at": now - dt.timedelta(seconds=float(uptime_seconds)),
            "protocol": int(protocol),
            "version": version,
            "device": device,
            "hostname": hostname,
            "interval_seconds": int(interval_seconds),
        },
    )
    return status


# --- The reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerState:
    """One active credential's worker as the pages show it."""

    label: str
    token_prefix: str
    online: bool
    last_seen_at: dt.datetime | None = None
    started_at: dt.datetime | None = None
    version: str = ""
    protocol: int | None = None
    device: str = ""
    hostname: str = ""

    @property
    def seen(self) -> bool:
        return self.last_seen_at is not None

    @property
    def device_kind(self) -> str:
        """``CUDA`` or ``CPU``, for a short label."""
        return "CUDA" if self.device.startswith("cuda") else "CPU" if self.device else ""


@dataclass(frozen=True)
class SiteWorkers:
    """A site's workers (one per active credential), most recently seen first."""

    institution_id: int
    workers: tuple[WorkerState, ...]

    @property
    def online(self) -> bool:
        return any(w.online for w in self.workers)

    @property
    def latest(self) -> WorkerState | None:
        """The worker to show in a one-line summary: an online one, else the last seen."""
        return self.workers[0] if self.workers else None

    @property
    def label(self) -> str:
        """``online``, ``offline``, ``never seen`` or ``no worker credentials``."""
        if not self.workers:
            return "no worker credentials"
        if self.online:
            return "online"
        return "offline" if self.latest.seen else "never seen"

    @property
    def tone(self) -> str:
        """The badge's tone (the stylesheet's ``ok``, ``bad`` and ``warn``)."""
        return "ok" if self.online else "bad" if self.workers else "warn"

    @property
    def sort_key(self) -> tuple:
        """Online first, then the most recently seen (for a sortable column)."""
        seen = self.latest.last_seen_at if self.latest else None
        return (not self.online, -(seen.timestamp() if seen else 0.0))


def _state(credential: SiteCredential, now: dt.datetime) -> WorkerState:
    status = getattr(credential, "worker_status", None)
    if status is None:
        return WorkerState(
            label=credential.label, token_prefix=credential.token_prefix, online=False
        )
    return WorkerState(
        label=credential.label,
        token_prefix=credential.token_prefix,
        online=now - status.last_seen_at <= online_window(status.interval_seconds),
        last_seen_at=status.last_seen_at,
        started_at=status.started_at,
        version=status.version,
        protocol=status.protocol,
        device=status.device,
        hostname=status.hostname,
    )


def site_workers(institution_ids, *, now: dt.datetime | None = None) -> dict[int, SiteWorkers]:
    """Per institution id (every one asked, with or without credentials), its active
    credentials' workers: online ones first, then by last report, never-seen ones last. One
    query."""
    now = now or timezone.now()
    ids = list(institution_ids)
    found: dict[int, list[WorkerState]] = {i: [] for i in ids}
    credentials = SiteCredential.objects.filter(
        institution_id__in=ids, revoked_at__isnull=True
    ).select_related("worker_status")
    for credential in credentials:
        found[credential.institution_id].append(_state(credential, now))
    epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
    return {
        i: SiteWorkers(
            institution_id=i,
            workers=tuple(
                sorted(
                    states,
                    key=lambda w: (not w.online, -(w.last_seen_at or epoch).timestamp(), w.label),
                )
            ),
        )
        for i, states in found.items()
    }
