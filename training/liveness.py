"""Is the coordinator alive? Heartbeats of the central processes, and what they say.

Three things keep rounds moving, and each can die without the web server noticing:

* the **coordinator**: the Celery worker of the ``central`` queue; its relay thread
  (``training.outbox``) writes a heartbeat every ``FL_COORDINATOR_HEARTBEAT_SECONDS``;
* the **periodic tick** (Celery beat sending ``training.rounds_tick``, run by the
  coordinator), which writes one per run: a coordinator without beat never times a round out;
* the **outbox relay**: messages committed but not yet taken by the broker; one pending for
  longer than ``FL_OUTBOX_STALE_SECONDS`` means the broker or the relay is down.

``/health/``, ``/metrics`` and the dashboard read :func:`service_statuses`. The heartbeats are
operational state (one row per process, overwritten in place), not governance acts, so they
are written in no ledger. The site workers' heartbeats are the site API's
(``training.rounds.heartbeats``).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from training import queues
from training.models import ServiceHeartbeat
from training.outbox import backlog, relay_pending

log = logging.getLogger(__name__)

COORDINATOR = ServiceHeartbeat.Component.COORDINATOR
TICK = ServiceHeartbeat.Component.TICK

#: A process is taken for dead after this many of its own intervals without a heartbeat.
MISSED_BEATS = 3


def _instance() -> tuple[str, str, int]:
    host = socket.gethostname()
    pid = os.getpid()
    return f"{host}:{pid}", host, pid


def record_heartbeat(component: str, *, interval_seconds: float, detail: dict | None = None):
    """Write (or refresh) this process's heartbeat for ``component``."""
    instance, host, pid = _instance()
    now = timezone.now()
    updated = ServiceHeartbeat.objects.filter(component=component, instance=instance).update(
        last_seen_at=now, interval_seconds=interval_seconds, detail=detail or {}
    )
    if not updated:
        ServiceHeartbeat.objects.update_or_create(
            component=component,
            instance=instance,
            defaults={
                "hostname": host,
                "pid": pid,
                "started_at": now,
                "last_seen_at": now,
                "interval_seconds": interval_seconds,
                "detail": detail or {},
            },
        )
    # Rows of processes gone for a day are forgotten (a restarted worker has a new pid).
    ServiceHeartbeat.objects.filter(
        component=component, last_seen_at__lt=now - dt.timedelta(days=1)
    ).delete()


@dataclass(frozen=True)
class ServiceStatus:
    """One central service as an operator sees it. ``age_seconds``: since it was last heard
    from (for the relay: the oldest pending message's age); None when never."""

    name: str
    ok: bool
    age_seconds: float | None
    summary: str
    instances: int = 0

    @property
    def label(self) -> str:
        return {"coordinator": "Coordinator", "tick": "Periodic tick", "relay": "Outbox relay"}[
            self.name
        ]


def _ago(seconds: float) -> str:
    if seconds < 90:
        return f"{round(seconds)} s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


def _process_status(name: str, component: str, *, what: str, now: dt.datetime) -> ServiceStatus:
    rows = list(ServiceHeartbeat.objects.filter(component=component))
    if not rows:
        return ServiceStatus(name, False, None, f"no {what} has ever been heard from")
    alive = [
        r
        for r in rows
        if (now - r.last_seen_at).total_seconds() <= MISSED_BEATS * max(r.interval_seconds, 1)
    ]
    latest = max(rows, key=lambda r: r.last_seen_at)
    age = max(0.0, (now - latest.last_seen_at).total_seconds())
    if alive:
        return ServiceStatus(
            name, True, age, f"{len(alive)} {what}(s) alive, last heard {_ago(age)} ago", len(alive)
        )
    return ServiceStatus(name, False, age, f"no {what} heard from for {_ago(age)}")


def service_statuses(now: dt.datetime | None = None) -> list[ServiceStatus]:
    """The coordinator, the periodic tick and the outbox relay, each ok or not, in words."""
    now = now or timezone.now()
    coordinator = _process_status("coordinator", COORDINATOR, what="coordinator", now=now)
    tick = _process_status("tick", TICK, what="periodic tick", now=now)
    if not tick.ok and tick.age_seconds is not None:
        tick = ServiceStatus(
            "tick",
            False,
            tick.age_seconds,
            f"the periodic tick has not run for {_ago(tick.age_seconds)} (is Celery beat "
            f"running? it should run every {queues.ROUNDS_TICK.every_seconds:g} s)",
        )
    pending = backlog()
    stale = float(getattr(settings, "FL_OUTBOX_STALE_SECONDS", 60))
    if pending.depth == 0:
        relay = ServiceStatus("relay", True, None, "nothing waits to be sent")
    elif pending.oldest_age_seconds is not None and pending.oldest_age_seconds > stale:
        relay = ServiceStatus(
            "relay",
            False,
            pending.oldest_age_seconds,
            f"{pending.depth} message(s) wait to be sent, the oldest for "
            f"{_ago(pending.oldest_age_seconds)} (is the broker or the coordinator down?)",
        )
    else:
        relay = ServiceStatus(
            "relay",
            True,
            pending.oldest_age_seconds,
            f"{pending.depth} message(s) on their way",
        )
    return [coordinator, tick, relay]


# --- The coordinator's thread: relay and heartbeat ----------------------------------------------

_thread: threading.Thread | None = None
_stop = threading.Event()


def start_coordinator_thread() -> threading.Thread:
    """Start (once per process) the coordinator's thread: it relays the outbox
    (``training.outbox``) every ``FL_OUTBOX_RELAY_SECONDS`` and writes the coordinator's
    heartbeat every ``FL_COORDINATOR_HEARTBEAT_SECONDS``. A daemon: it dies with the worker,
    whose restart starts a new one; so a heartbeat means a process that also relays."""
    global _thread
    if _thread is not None and _thread.is_alive():
        return _thread
    _stop.clear()
    _thread = threading.Thread(target=_relay_forever, name="coordinator-relay", daemon=True)
    _thread.start()
    return _thread


def stop_coordinator_thread(timeout: float = 5.0) -> None:
    _stop.set()
    if _thread is not None:
        _thread.join(timeout)


def _relay_forever() -> None:
    every = float(getattr(settings, "FL_OUTBOX_RELAY_SECONDS", 1.0))
    heartbeat_every = float(getattr(settings, "FL_COORDINATOR_HEARTBEAT_SECONDS", 5.0))
    last_heartbeat = 0.0
    last_pass: dict = {}
    failures = 0
    clock = timezone.now
    while not _stop.is_set():
        try:
            result = relay_pending()
            last_pass = {
                "relay_at": clock().isoformat(),
                "relay_sent": result.sent,
                "relay_failed": result.failed,
            }
            now_s = clock().timestamp()
            if now_s - last_heartbeat >= heartbeat_every:
                record_heartbeat(COORDINATOR, interval_seconds=heartbeat_every, detail=last_pass)
                last_heartbeat = now_s
            failures = 0
        except DatabaseError:
            failures += 1
            log.warning("the outbox relay lost the database (%s in a row)", failures, exc_info=True)
            close_old_connections()
            connection.close()  # a broken connection is replaced at the next query
        except Exception:  # noqa: BLE001 - the relay must outlive any one bad pass
            failures += 1
            log.exception("the outbox relay's pass failed")
        # Back off while the database is away (at most 30 s between tries), else every second.
        _stop.wait(min(30.0, every * (2 ** min(failures, 5))) if failures else every)
    connection.close()
