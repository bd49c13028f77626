"""The health probe talks to the configured services for real: SQLite and the
filesystem broker by default, PostgreSQL and Redis when CI configures them."""

import pytest

from consortium import health


@pytest.mark.django_db
def test_health_reports_every_configured_service(client):
    response = client.get("/health/")
    body = response.json()
    assert response.status_code == 200, body
    assert set(body["checks"]) == {"database", "broker", "channel_layer"}
    assert all(check["ok"] for check in body["checks"].values())


@pytest.mark.django_db
def test_health_names_the_failing_service(client, monkeypatch):
    # Nothing listens on port 1: the probe must say the broker is unreachable.
    monkeypatch.setattr(health, "broker_config", lambda: ("redis://127.0.0.1:1/0", {}))
    response = client.get("/health/")
    body = response.json()
    assert response.status_code == 503
    assert body["status"] == "failing"
    assert not body["checks"]["broker"]["ok"]
    assert "Error" in body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"]


def test_channel_layer_round_trip():
    health.check_channel_layer()
