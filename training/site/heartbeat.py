"""The site worker's heartbeat: it tells the central server, every ``SITE_HEARTBEAT_SECONDS``,
that it is online, with its release, its site protocol, the device it trains on and its host
(``POST /api/site/v1/heartbeat/``; stored by ``training.rounds.heartbeats``), so that the
institution's page, the dashboard and a job's approver can see whether the site's worker is
there before anything is asked of it.

It runs in a daemon thread of the site worker's main process, started when Celery says the
worker is ready (``worker_ready``, connected by ``run_site_worker`` only, so no other Celery
process beats for a site) and stopped with it. It is plain HTTP from the standard library: no
torch, no Django. The device is known before the worker starts (``run_site_worker`` asks a
short-lived subprocess), so this thread never touches CUDA. A failed beat is logged once per
streak of failures and tried again at the next interval: the worker's tasks never wait on it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

from training.site.client import CentralClient, CentralError
from training.site.protocol import worker_version

log = logging.getLogger(__name__)

__all__ = ["Heartbeat", "start_on_worker_ready"]


class Heartbeat:
    """Reports ``client``'s worker online now and then every ``interval`` seconds."""

    def __init__(
        self,
        client: CentralClient,
        *,
        device: str,
        interval: float | None = None,
        version: str | None = None,
        hostname: str | None = None,
    ):
        self.client = client
        self.device = device
        self.interval = float(interval or client.config.heartbeat_seconds)
        self.version = version or worker_version()
        self.hostname = (hostname if hostname is not None else socket.gethostname())[:255]
        self.beats = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def report(self) -> dict:
        return {
            "version": self.version,
            "device": self.device,
            "hostname": self.hostname,
            "interval_seconds": max(5, round(self.interval)),
            "uptime_seconds": round(time.monotonic() - self._started, 3),
        }

    def beat(self) -> bool:
        """One heartbeat; False (logged, once per streak) when it did not go through."""
        try:
            self.client.heartbeat(self.report())
        except (CentralError, ValueError) as exc:
            if not self._failing:
                log.warning(
                    "heartbeat to %s failed (retrying every %.0f s): %s",
                    self.client.config.central_url,
                    self.interval,
                    exc,
                )
            self._failing = True
            return False
        if self._failing:
            log.info("heartbeat to %s goes through again", self.client.config.central_url)
        self._failing = False
        self.beats += 1
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            self.beat()
            self._stop.wait(self.interval)

    def start(self) -> threading.Thread:
        """Beat now and then every interval, from a daemon thread (idempotent)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="site-heartbeat", daemon=True)
            self._thread.start()
        return self._thread

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)


def start_on_worker_ready(heartbeat: Heartbeat) -> Callable[[], None]:
    """Start ``heartbeat`` when this process's Celery worker is ready, and stop it when the
    worker shuts down. Connected by ``run_site_worker`` in the site worker's process only;
    returns what disconnects both."""
    from celery import signals  # the worker's dependency; the module stays light to import

    def _ready(sender=None, **_kwargs):
        log.info(
            "site worker ready: heartbeat every %.0f s to %s",
            heartbeat.interval,
            heartbeat.client.config.central_url,
        )
        heartbeat.start()

    def _shutdown(sender=None, **_kwargs):
        heartbeat.stop(timeout=1.0)

    # weak=False: the closures live only in these connections.
    signals.worker_ready.connect(_ready, weak=False)
    signals.worker_shutdown.connect(_shutdown, weak=False)

    def disconnect() -> None:
        signals.worker_ready.disconnect(_ready)
        signals.worker_shutdown.disconnect(_shutdown)
        heartbeat.stop(timeout=1.0)

    return disconnect
