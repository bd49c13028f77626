"""The health probe talks to the configured services for real: SQLite and the
filesystem broker by default, PostgreSQL and Redis when CI configures them; and it says
whether the coordinator's parts are alive, from their heartbeats and the outbox."""

import datetime as dt

import pytest
from django.utils import timezone

from consortium import health
from training import liveness, queues
from training.models import OutboxMessage, ServiceHeartbeat


def _coordinator_alive():
    liveness.record_heartbeat(liveness.COORDINATOR, interval_seconds=5)
    liveness.record_heartbeat(liveness.TICK, interval_seconds=queues.ROUNDS_TICK.every_seconds)


@pytest.mark.django_db
def test_health_reports_every_configured_service(client):
    _coordinator_alive()
    response = client.get("/health/")
    body = response.json()
    assert response.status_code == 200, body
    assert set(body["checks"]) == {
        "database",
        "broker",
        "channel_layer",
        "coordinator",
        "tick",
        "relay",
    }
    assert all(check["ok"] for check in body["checks"].values())


@pytest.mark.django_db
def test_the_web_scope_checks_the_web_tier_only(client):
    response = client.get("/health/?scope=web")  # no coordinator has ever run here
    body = response.json()
    assert response.status_code == 200, body
    assert set(body["checks"]) == {"database", "broker", "channel_layer"}


@pytest.mark.django_db
def test_health_names_the_failing_service(client, monkeypatch):
    _coordinator_alive()
    # Nothing listens on port 1: the probe must say the broker is unreachable.
    monkeypatch.setattr(health, "broker_config", lambda: ("redis://127.0.0.1:1/0", {}))
    response = client.get("/health/")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "failing"
    assert not body["checks"]["broker"]["ok"]
    assert "Error" in body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"]


@pytest.mark.django_db
def test_a_coordinator_never_started_fails_the_probe(client):
    body = client.get("/health/").json()
    assert body["status"] == "failing"
    assert body["checks"]["coordinator"] == {
        "ok": False,
        "error": "no coordinator has ever been heard from",
        "ms": body["checks"]["coordinator"]["ms"],
    }
    assert "no periodic tick" in body["checks"]["tick"]["error"]
    assert body["checks"]["relay"]["ok"]  # nothing waits to be sent


@pytest.mark.django_db
def test_a_dead_coordinator_and_a_stuck_outbox_fail_the_probe_in_words(client):
    _coordinator_alive()
    long_ago = timezone.now() - dt.timedelta(minutes=4)
    ServiceHeartbeat.objects.update(last_seen_at=long_ago)
    OutboxMessage.objects.create(
        task=queues.ROUND_MAYBE_CLOSE.name, queue="central", args=[1], created_at=long_ago
    )
    response = client.get("/health/")
    checks = response.json()["checks"]
    assert response.status_code == 503
    assert checks["coordinator"]["error"] == "no coordinator heard from for 4 min"
    assert checks["tick"]["error"].startswith("the periodic tick has not run for 4 min")
    assert "Celery beat" in checks["tick"]["error"]
    assert checks["relay"]["error"].startswith("1 message(s) wait to be sent, the oldest for 4 min")
    # The web tier is fine, and says so.
    assert client.get("/health/?scope=web").status_code == 200


def test_channel_layer_round_trip():
    health.check_channel_layer()


@pytest.mark.django_db
def test_one_probe_reads_the_coordinators_heartbeats_once(client, monkeypatch):
    """The coordinator, tick and relay checks share one read of the heartbeats and the outbox
    (a load balancer probes every few seconds)."""
    _coordinator_alive()
    reads = []
    real = liveness.service_statuses

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(liveness, "service_statuses", counted)
    body = client.get("/health/").json()
    assert body["status"] == "ok", body
    assert len(reads) == 1
    client.get("/health/")
    assert len(reads) == 2  # not cached across probes: each probe reads afresh
