"""The consortium dashboard's *Services* panel: is anything down? For operators only.

Why: a dead coordinator, a periodic tick that stopped, an outbox the broker no longer takes, or
a site worker gone quiet all look, from a job's page, like a round taking its time. The panel
puts them in one place for those who can act on them (the platform's operators and the
consortium's administrators), red when down, each with how long in words: the central
services from :func:`training.liveness.service_statuses` with each process behind them (host,
pid, last heard), and each institution's site worker from its heartbeats
(:mod:`training.rounds.heartbeats`).

Hostnames and process ids are an operator's business: the panel is not rendered for anyone
else, and the pages everyone reads (the job page) never name a host.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from django.utils import timezone

from consortium.core.access import may
from training.liveness import MISSED_BEATS, service_statuses
from training.models import ServiceHeartbeat
from training.rounds.heartbeats import SiteWorkers
from training.rounds.liveness_words import clock, duration_words

__all__ = ["ServicesPanel", "can_see_services", "services_panel"]


def can_see_services(user, consortium) -> bool:
    """The platform's operators (superusers, and staff: whom ``/metrics`` serves too) and the
    consortium's administrators (the rule ``consortium.view_services``)."""
    return bool(user is not None and may(user, "consortium.view_services", consortium))


@dataclass(frozen=True)
class Process:
    """One central process that wrote a heartbeat (a coordinator worker, a tick's host)."""

    instance: str
    hostname: str
    pid: int | None
    alive: bool
    heard: str  # "4 min ago (09:12 UTC)"


@dataclass(frozen=True)
class Service:
    name: str
    label: str
    ok: bool
    summary: str
    processes: tuple[Process, ...] = ()


@dataclass(frozen=True)
class SiteRow:
    institution: str
    ok: bool
    label: str  # online, offline, never connected, no worker credentials
    text: str
    hostname: str = ""


@dataclass(frozen=True)
class ServicesPanel:
    services: tuple[Service, ...]
    sites: tuple[SiteRow, ...]

    @property
    def down(self) -> int:
        """How many services and site workers are down (the panel's heading says it)."""
        return sum(not s.ok for s in self.services) + sum(not s.ok for s in self.sites)


def services_panel(
    institutions, workers: dict[int, SiteWorkers], *, now: dt.datetime | None = None
) -> ServicesPanel:
    """The panel for these institutions, whose workers the dashboard has already read
    (``workers``, from :func:`training.rounds.heartbeats.site_workers`). A fixed number of
    queries: the services' statuses and their heartbeat rows."""
    now = now or timezone.now()
    rows: dict[str, list[Process]] = {}
    for beat in ServiceHeartbeat.objects.order_by("component", "-last_seen_at"):
        age = now - beat.last_seen_at
        rows.setdefault(beat.component, []).append(
            Process(
                instance=beat.instance,
                hostname=beat.hostname,
                pid=beat.pid,
                alive=age.total_seconds() <= MISSED_BEATS * max(beat.interval_seconds, 1),
                heard=f"{duration_words(age)} ago ({clock(beat.last_seen_at, now=now)})",
            )
        )
    services = tuple(
        Service(
            name=s.name,
            label=s.label,
            ok=s.ok,
            summary=s.summary,
            processes=tuple(rows.get(s.name, ())),
        )
        for s in service_statuses(now)
    )
    sites = sorted(
        (_site_row(i.name, workers.get(i.pk), now) for i in institutions),
        key=lambda r: (r.ok, r.institution),
    )
    return ServicesPanel(services=services, sites=tuple(sites))


def _site_row(name: str, workers: SiteWorkers | None, now: dt.datetime) -> SiteRow:
    if workers is None or not workers.workers:
        return SiteRow(name, False, "no worker credentials", "no worker can connect for it")
    latest = workers.latest
    if workers.online:
        return SiteRow(
            name,
            True,
            "online",
            f"last heard {duration_words(now - latest.last_seen_at)} ago, "
            f"up for {duration_words(now - latest.started_at)}",
            latest.hostname,
        )
    if not latest.seen:
        return SiteRow(name, False, "never connected", "its worker has never reported")
    return SiteRow(
        name,
        False,
        "offline",
        f"offline for {duration_words(now - latest.last_seen_at)} "
        f"(last heard {clock(latest.last_seen_at, now=now)})",
        latest.hostname,
    )
