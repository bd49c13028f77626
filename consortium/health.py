"""Health checks for operators and load balancers.

``GET /health/`` answers 200 when everything passes and 503 naming what fails: can this
process reach the database, the broker and the channel layer it is configured with (the web
tier), and are the coordinator's parts alive (``training.liveness``): its worker (heartbeat),
the periodic tick (Celery beat) and the outbox relay (no message waiting too long). A dead
coordinator used to leave ``/health/`` at 200 while every job froze.

``GET /health/?scope=web`` checks the web tier only: for a load balancer, which should not take
a web server out of rotation because the coordinator is down, and for start-up scripts that
wait for the server before the coordinator has had time to beat.

It needs no login, like Healthchecks' own probe, and says nothing about data. To anyone it
answers only ``{"status": "ok" | "failing", "failing": [names of the failing checks]}``: the
database vendor, the broker's kind, each check's timing and its error text help an attacker
more than a load balancer, which reads the status code. The detail (``checks`` with each
check's time and error, ``database_vendor``, ``broker``) goes to the same operators as
``/metrics``: a signed-in staff member or superuser, or a monitor that sends
``Authorization: Bearer <METRICS_TOKEN>`` (one token for an operator's monitoring, not two to
rotate). A wrong token gets the short answer, with the same status code: the probe never
fails because of who asks.
"""

from __future__ import annotations

import contextlib
import contextvars
import hmac
import time
import uuid
from collections.abc import Callable, Iterator

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection


def check_database() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()


def broker_config() -> tuple[str, dict]:
    from consortium.celery import app  # on use: the web process needs the app only here

    return app.conf.broker_url, dict(app.conf.broker_transport_options or {})


def check_broker() -> None:
    url, options = broker_config()
    with Connection(url, transport_options=options, connect_timeout=3) as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


def check_channel_layer() -> None:
    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured")
    channel = async_to_sync(layer.new_channel)("health.")
    token = uuid.uuid4().hex
    async_to_sync(layer.send)(channel, {"type": "health.ping", "token": token})
    message = async_to_sync(layer.receive)(channel)
    if message.get("token") != token:
        raise RuntimeError("the channel layer returned another message")


#: The coordinator's service statuses read once for the probe in progress (:func:`run_checks`):
#: its three checks share one read of the heartbeats and the outbox instead of three.
_PROBE_STATUSES: contextvars.ContextVar[Callable[[], dict] | None] = contextvars.ContextVar(
    "health_probe_statuses", default=None
)


def _read_service_statuses() -> dict:
    from training.liveness import service_statuses  # on use: the models load after setup

    return {status.name: status for status in service_statuses()}


@contextlib.contextmanager
def _one_read_per_probe() -> Iterator[None]:
    memo: dict = {}

    def statuses() -> dict:
        if "read" not in memo:
            memo["read"] = _read_service_statuses()
        return memo["read"]

    token = _PROBE_STATUSES.set(statuses)
    try:
        yield
    finally:
        _PROBE_STATUSES.reset(token)


def _service_check(name: str):
    """A check of one coordinator service, from its heartbeat (``training.liveness``)."""

    def check() -> None:
        shared = _PROBE_STATUSES.get()
        status = (shared() if shared is not None else _read_service_statuses())[name]
        if not status.ok:
            raise ServiceDown(status.summary)

    return check


class ServiceDown(RuntimeError):
    pass


WEB_CHECKS = {
    "database": check_database,
    "broker": check_broker,
    "channel_layer": check_channel_layer,
}
COORDINATOR_CHECKS = {
    "coordinator": _service_check("coordinator"),
    "tick": _service_check("tick"),
    "relay": _service_check("relay"),
}
CHECKS = {**WEB_CHECKS, **COORDINATOR_CHECKS}


def run_checks(checks: dict | None = None) -> dict[str, dict]:
    """Run ``checks`` (all by default), each timed, none raising: a failure is its result."""
    results = {}
    with _one_read_per_probe():
        for name, check in (CHECKS if checks is None else checks).items():
            started = time.perf_counter()
            try:
                check()
            except ServiceDown as exc:
                results[name] = {"ok": False, "error": str(exc)[:300]}
            except Exception as exc:  # noqa: BLE001 - report any failure, never raise
                results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
            else:
                results[name] = {"ok": True}
            results[name]["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return results


def is_operator(request) -> bool:
    """Whether the detail may be shown: a staff member or superuser signed in, or the
    ``METRICS_TOKEN`` as a bearer token (compared in constant time)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = settings.METRICS_TOKEN
    if scheme.lower() == "bearer" and expected:
        return hmac.compare_digest(token.strip().encode(), expected.encode())
    user = getattr(request, "user", None)
    return bool(user is not None and user.is_authenticated and (user.is_staff or user.is_superuser))


@never_cache
@require_GET
def health_view(request):
    web_only = request.GET.get("scope") == "web"
    results = run_checks(WEB_CHECKS if web_only else CHECKS)
    failing = [name for name, result in results.items() if not result["ok"]]
    body: dict = {"status": "failing" if failing else "ok", "failing": failing}
    if is_operator(request):
        body |= {
            "checks": results,
            "database_vendor": connection.vendor,
            "broker": settings.CELERY_BROKER_URL.split(":", 1)[0],
        }
    return JsonResponse(body, status=503 if failing else 200)
