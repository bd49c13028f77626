"""``GET /metrics``: what an operator's Prometheus scrapes, in its text exposition format.

The numbers about rounds, updates, the outbox, the central services and the sites' workers
live in the database, which every process shares; so they are not counted in any process's
memory but read at scrape time by :class:`OperationsCollector`, a fixed handful of grouped
queries whatever the number of jobs (``training.rounds.operations_selectors``,
``training.liveness``, ``training.outbox``). The broker's queue depths are asked of the broker
at the same time (``consortium.observability.queues``). Only the request latency histogram is
kept in memory, per web process (``consortium.observability.middleware``).

Everything is registered on :data:`REGISTRY`, this module's own, never on prometheus_client's
global default registry: the process's garbage-collector and platform collectors are not
mixed in, and a test can build a registry of its own (:func:`build_registry`).

Only operators may read it: a signed-in superuser or staff member (the admin site's people),
or a scraper that sends ``Authorization: Bearer <METRICS_TOKEN>`` when that setting is set
(compared in constant time). Anyone else gets 403 (401 when not signed in and sending no
token), with a plain message, never a redirect to the sign-in page: a scraper cannot follow
one. The counts say how busy each site is, which is the consortium's business, not the
public's.
"""

from __future__ import annotations

import hmac
import time

from django.conf import settings
from django.db import connection
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from consortium.observability import queues as broker_queues
from consortium.observability.middleware import REQUEST_LATENCY
from training.liveness import service_statuses
from training.models import Round
from training.outbox import backlog
from training.rounds import operations_selectors as ops
from training.site.protocol import SITE_PROTOCOL, worker_version

__all__ = ["REGISTRY", "OperationsCollector", "build_registry", "metrics_view"]

#: The round states after which a deadline still matters (a closed or failed round is done).
_LIVE_ROUND_STATES = (Round.State.OPEN, Round.State.AGGREGATING)


class OperationsCollector(Collector):
    """The platform's state as gauges and counters, read from the database (and the broker)
    on each scrape. ``queue_depths`` is how the broker is asked (a test passes one that
    names an unreachable broker)."""

    def __init__(self, *, queue_depths=broker_queues.queue_depths):
        self._queue_depths = queue_depths

    def describe(self):
        # Nothing at registration: describing would read the database at import time.
        return []

    def collect(self):
        started = time.perf_counter()
        now = timezone.now()
        yield self._build_info()
        yield from self._jobs_and_rounds(now)
        yield from self._updates()
        yield from self._outbox()
        yield from self._services(now)
        yield from self._site_workers(now)
        yield from self._broker()
        took = GaugeMetricFamily(
            "fl_metrics_collect_seconds",
            "Seconds this scrape took to read the database and the broker.",
        )
        took.add_metric([], time.perf_counter() - started)
        yield took

    # --- The parts -------------------------------------------------------------------------

    @staticmethod
    def _build_info():
        info = InfoMetricFamily(
            "fl_build",
            "This server's release, the site protocol it speaks, its database and its broker.",
        )
        info.add_metric(
            [],
            {
                "version": worker_version(),
                "site_protocol": str(SITE_PROTOCOL),
                "database": connection.vendor,
                "broker": settings.CELERY_BROKER_URL.split(":", 1)[0],
            },
        )
        return info

    @staticmethod
    def _jobs_and_rounds(now):
        jobs = GaugeMetricFamily("fl_jobs", "Training jobs, by state.", labels=["state"])
        for state, count in ops.jobs_by_state().items():
            jobs.add_metric([state], count)
        yield jobs

        rounds = GaugeMetricFamily(
            "fl_rounds",
            "Rounds, by their state and their job's state.",
            labels=["state", "job_state"],
        )
        past = GaugeMetricFamily(
            "fl_rounds_past_deadline",
            "Rounds still open or aggregating after their deadline (the periodic tick closes "
            "or fails them; a count that stays up means the tick is not running).",
            labels=["state"],
        )
        leases = GaugeMetricFamily(
            "fl_round_leases_expired",
            "Rounds aggregating under a claim whose lease ran out (a coordinator died while "
            "aggregating; the next tick claims them again).",
        )
        past_by_state = dict.fromkeys(_LIVE_ROUND_STATES, 0)
        expired = 0
        for row in ops.rounds_by_state(now):
            rounds.add_metric([row.state, row.job_state], row.count)
            if row.state in past_by_state:
                past_by_state[row.state] += row.past_deadline
            expired += row.lease_expired
        for state, count in past_by_state.items():
            past.add_metric([state], count)
        leases.add_metric([], expired)
        yield rounds
        yield past
        yield leases

    @staticmethod
    def _updates():
        updates = GaugeMetricFamily(
            "fl_site_updates",
            "Sites' updates, by status: dispatched (asked, not yet received), accepted, "
            "rejected, straggler (never received).",
            labels=["status"],
        )
        for status, count in ops.site_updates_by_status().items():
            updates.add_metric([status], count)
        yield updates
        rejected = CounterMetricFamily(
            "fl_site_updates_rejected",
            "Updates refused and recorded against their site, by refusal code (the ledger's "
            "round.update_rejected code, e.g. bad_signature, digest_mismatch); replays, "
            "refused without penalty, are not counted.",
            labels=["reason"],
        )
        for code, count in sorted(ops.rejections_by_code().items()):
            rejected.add_metric([code], count)
        yield rejected

    @staticmethod
    def _outbox():
        pending = backlog()
        depth = GaugeMetricFamily(
            "fl_outbox_pending",
            "Messages committed in the outbox and not yet taken by the broker.",
        )
        depth.add_metric([], pending.depth)
        age = GaugeMetricFamily(
            "fl_outbox_oldest_pending_age_seconds",
            "Age of the oldest message still waiting in the outbox (0 when none waits).",
        )
        age.add_metric([], pending.oldest_age_seconds or 0.0)
        failing = GaugeMetricFamily(
            "fl_outbox_failing",
            "Pending outbox messages the broker has refused at least once.",
        )
        failing.add_metric([], pending.failing)
        yield depth
        yield age
        yield failing

    @staticmethod
    def _services(now):
        up = GaugeMetricFamily(
            "fl_service_up",
            "1 when the central service works: the coordinator and the periodic tick have "
            "written a heartbeat within three of their intervals, the relay has no message "
            "pending longer than FL_OUTBOX_STALE_SECONDS.",
            labels=["service"],
        )
        age = GaugeMetricFamily(
            "fl_service_heartbeat_age_seconds",
            "Seconds since the coordinator or the tick last wrote a heartbeat; for the relay, "
            "the age of the oldest pending outbox message. Absent when never heard from (or, "
            "for the relay, when nothing waits).",
            labels=["service"],
        )
        instances = GaugeMetricFamily(
            "fl_service_instances",
            "Live processes of the central service (coordinator workers, tick runners).",
            labels=["service"],
        )
        for status in service_statuses(now):
            up.add_metric([status.name], 1 if status.ok else 0)
            if status.age_seconds is not None:
                age.add_metric([status.name], status.age_seconds)
            if status.name != "relay":
                instances.add_metric([status.name], status.instances)
        yield up
        yield age
        yield instances

    @staticmethod
    def _site_workers(now):
        up = GaugeMetricFamily(
            "fl_site_worker_up",
            "1 while one of the site's workers reported within three of its heartbeat "
            "intervals; one series per site with live worker credentials.",
            labels=["site"],
        )
        age = GaugeMetricFamily(
            "fl_site_worker_heartbeat_age_seconds",
            "Seconds since the site's most recent worker heartbeat (absent: never heard from).",
            labels=["site"],
        )
        for beat in ops.site_worker_beats(now):
            up.add_metric([beat.site], 1 if beat.online else 0)
            if beat.age_seconds is not None:
                age.add_metric([beat.site], beat.age_seconds)
        yield up
        yield age

    def _broker(self):
        answer = self._queue_depths(ops.queues_to_measure())
        up = GaugeMetricFamily(
            "fl_broker_up", "1 when the broker answered this scrape, 0 when it did not."
        )
        up.add_metric([], 1 if answer.up else 0)
        yield up
        depth = GaugeMetricFamily(
            "fl_broker_queue_messages",
            "Messages waiting in a broker queue (central, and site.<slug> of each site with "
            "live worker credentials or in a running job); absent when the broker is down.",
            labels=["queue"],
        )
        for queue, count in answer.depths.items():
            depth.add_metric([queue], count)
        yield depth


def build_registry(*, collector: OperationsCollector | None = None) -> CollectorRegistry:
    """A registry of our own with the operations collector and the request histogram."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector or OperationsCollector())
    registry.register(REQUEST_LATENCY)
    return registry


REGISTRY = build_registry()


# --- The view ----------------------------------------------------------------------------------


def _forbidden(message: str, status: int = 403) -> HttpResponse:
    response = HttpResponse(message + "\n", status=status, content_type="text/plain")
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


def _refusal(request) -> HttpResponse | None:
    """None when the request comes from an operator, else the answer that refuses it."""
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer":
        expected = settings.METRICS_TOKEN
        if not expected:
            return _forbidden("Bearer tokens are not accepted here: METRICS_TOKEN is not set.")
        if hmac.compare_digest(token.strip().encode(), expected.encode()):
            return None
        return _forbidden("The bearer token is not this server's METRICS_TOKEN.")
    # No user at all on the site API's own server, which keeps no sessions (SITE_API_ONLY).
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return _forbidden(
            "The metrics are for operators: sign in as a staff member, or send "
            "Authorization: Bearer <METRICS_TOKEN>.",
            status=401,
        )
    if user.is_superuser or user.is_staff:
        return None
    return _forbidden("The metrics are for operators (staff or superusers) only.")


@never_cache
@require_GET
def metrics_view(request):
    """The exposition, in the format the scraper's ``Accept`` asks for (Prometheus's text
    format by default, OpenMetrics when asked), to operators only (the module's docstring)."""
    refusal = _refusal(request)
    if refusal is not None:
        return refusal
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(REGISTRY), content_type=content_type)
