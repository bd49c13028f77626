"""Health checks for operators and load balancers: can this process reach the
database, the broker and the channel layer it is configured with?

``GET /health/`` answers 200 when all pass and 503 naming the failing ones. It
says nothing about data and needs no login, like Healthchecks' own probe.
"""

from __future__ import annotations

import time
import uuid

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


CHECKS = {
    "database": check_database,
    "broker": check_broker,
    "channel_layer": check_channel_layer,
}


def run_checks() -> dict[str, dict]:
    results = {}
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            check()
        except Exception as exc:  # noqa: BLE001 - report any failure, never raise
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        else:
            results[name] = {"ok": True}
        results[name]["ms"] = round((time.perf_counter() - started) * 1000, 1)
    return results


@never_cache
@require_GET
def health_view(request):
    results = run_checks()
    healthy = all(r["ok"] for r in results.values())
    body = {
        "status": "ok" if healthy else "failing",
        "checks": results,
        "database_vendor": connection.vendor,
        "broker": settings.CELERY_BROKER_URL.split(":", 1)[0],
    }
    return JsonResponse(body, status=200 if healthy else 503)
