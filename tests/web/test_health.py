"""The health probe talks to the configured services for real: SQLite and the
filesystem broker by default, PostgreSQL and Redis when CI configures them; and it says
whether the coordinator's parts are alive, from their heartbeats and the outbox.

The detail (each check, its time and error, the database vendor) is for operators: the tests
that read it ask as a superuser (``admin_client``); what anyone else gets is tested below."""

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
def test_health_reports_every_configured_service(admin_client):
    _coordinator_alive()
    response = admin_client.get("/health/")
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
def test_the_web_scope_checks_the_web_tier_only(admin_client):
    response = admin_client.get("/health/?scope=web")  # no coordinator has ever run here
    body = response.json()
    assert response.status_code == 200, body
    assert set(body["checks"]) == {"database", "broker", "channel_layer"}


@pytest.mark.django_db
def test_health_names_the_failing_service(admin_client, monkeypatch):
    _coordinator_alive()
    # Nothing listens on port 1: the probe must say the broker is unreachable.
    monkeypatch.setattr(health, "broker_config", lambda: ("redis://127.0.0.1:1/0", {}))
    response = admin_client.get("/health/")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "failing"
    assert not body["checks"]["broker"]["ok"]
    assert "Error" in body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"]


@pytest.mark.django_db
def test_a_coordinator_never_started_fails_the_probe(admin_client):
    body = admin_client.get("/health/").json()
    assert body["status"] == "failing"
    assert body["checks"]["coordinator"] == {
        "ok": False,
        "error": "no coordinator has ever been heard from",
        "ms": body["checks"]["coordinator"]["ms"],
    }
    assert "no periodic tick" in body["checks"]["tick"]["error"]
    assert body["checks"]["relay"]["ok"]  # nothing waits to be sent


@pytest.mark.django_db
def test_a_dead_coordinator_and_a_stuck_outbox_fail_the_probe_in_words(admin_client):
    _coordinator_alive()
    long_ago = timezone.now() - dt.timedelta(minutes=4)
    ServiceHeartbeat.objects.update(last_seen_at=long_ago)
    OutboxMessage.objects.create(
        task=queues.ROUND_MAYBE_CLOSE.name, queue="central", args=[1], created_at=long_ago
    )
    response = admin_client.get("/health/")
    checks = response.json()["checks"]
    assert response.status_code == 503
    assert checks["coordinator"]["error"] == "no coordinator heard from for 4 min"
    assert checks["tick"]["error"].startswith("the periodic tick has not run for 4 min")
    assert "Celery beat" in checks["tick"]["error"]
    assert checks["relay"]["error"].startswith("1 message(s) wait to be sent, the oldest for 4 min")
    # The web tier is fine, and says so.
    assert admin_client.get("/health/?scope=web").status_code == 200


def test_channel_layer_round_trip():
    health.check_channel_layer()


@pytest.mark.django_db
def test_one_probe_reads_the_coordinators_heartbeats_once(admin_client, monkeypatch):
    """The coordinator, tick and relay checks share one read of the heartbeats and the outbox
    (a load balancer probes every few seconds)."""
    _coordinator_alive()
    reads = []
    real = liveness.service_statuses

    def counted(*args, **kwargs):
        reads.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(liveness, "service_statuses", counted)
    body = admin_client.get("/health/").json()
    assert body["status"] == "ok", body
    assert len(reads) == 1
    admin_client.get("/health/")
    assert len(reads) == 2  # not cached across probes: each probe reads afresh


TOKEN = "t" * 40


@pytest.mark.django_db
def test_anyone_else_learns_only_the_status_and_the_failing_names(client, monkeypatch):
    """No vendor, broker kind, timing or error text to an anonymous caller, healthy or not;
    the status code is the same as an operator's (a load balancer reads only that)."""
    _coordinator_alive()
    response = client.get("/health/")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "failing": []}
    monkeypatch.setattr(health, "broker_config", lambda: ("redis://127.0.0.1:1/0", {}))
    response = client.get("/health/")
    assert response.status_code == 503
    assert response.json() == {"status": "failing", "failing": ["broker"]}
    assert b"redis" not in response.content and b"Error" not in response.content
    web = client.get("/health/?scope=web")
    assert (web.status_code, web.json()) == (503, {"status": "failing", "failing": ["broker"]})


@pytest.mark.django_db
def test_a_member_who_is_not_staff_gets_the_short_answer(client, django_user_model):
    user = django_user_model.objects.create_user("member", password="x" * 12)
    client.force_login(user)
    body = client.get("/health/?scope=web").json()
    assert body == {"status": "ok", "failing": []}
    user.is_staff = True
    user.save()
    body = client.get("/health/?scope=web").json()
    assert body["database_vendor"]  # sqlite here, postgresql when CI configures it
    assert set(body["checks"]) == {"database", "broker", "channel_layer"}


@pytest.mark.django_db
def test_the_metrics_token_shows_the_detail_and_a_wrong_one_does_not(client, settings):
    settings.METRICS_TOKEN = TOKEN
    detailed = client.get("/health/?scope=web", HTTP_AUTHORIZATION=f"Bearer {TOKEN}").json()
    assert set(detailed) == {"status", "failing", "checks", "database_vendor", "broker"}
    assert "ms" in detailed["checks"]["database"]
    wrong = client.get("/health/?scope=web", HTTP_AUTHORIZATION="Bearer " + "x" * 40)
    assert (wrong.status_code, wrong.json()) == (200, {"status": "ok", "failing": []})
    settings.METRICS_TOKEN = ""  # unset: no bearer token is accepted, even an empty one
    empty = client.get("/health/?scope=web", HTTP_AUTHORIZATION="Bearer ").json()
    assert "checks" not in empty
