"""The site API's version and protocol, its endpoints about the worker itself (whoami's key,
the registered data sets, the heartbeat), and the selector that says whether a site's worker
is online (``training.rounds.heartbeats``)."""

from __future__ import annotations

import datetime as dt

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from tests.support.training_fixtures import offer_dataset
from training.fl.signing import generate_keypair
from training.models import SiteWorkerStatus
from training.rounds import credentials
from training.rounds.heartbeats import MISSED_BEATS, site_workers, worker_heartbeat_record
from training.site.protocol import SITE_PROTOCOL, protocol_refusal

V1 = "/api/site/v1/"
BEAT = {
    "version": "0.1.0",
    "device": "cuda:NVIDIA H200",
    "hostname": "gpu-1",
    "interval_seconds": 30,
}


def make_credential(cast, institution=None, label="gpu-node-1"):
    _private, public_pem = generate_keypair()
    credential, token = credentials.site_credential_create(
        acting_user=cast.steward,
        institution=institution or cast.hospital_a,
        label=label,
        public_key=public_pem,
    )
    return credential, token, public_pem


def site_client(token, protocol=SITE_PROTOCOL) -> APIClient:
    client = APIClient()
    headers = {"HTTP_AUTHORIZATION": f"Site {token}"}
    if protocol is not None:
        headers["HTTP_X_SITE_PROTOCOL"] = str(protocol)
    client.credentials(**headers)
    return client


# --- The version and the protocol ----------------------------------------------------------------


def test_the_site_api_is_served_under_v1_only(cast):
    _credential, token, _key = make_credential(cast)
    client = site_client(token)
    assert client.get(f"{V1}whoami/").status_code == 200
    assert client.get("/api/site/whoami/").status_code == 404


@pytest.mark.parametrize(
    "sent, says",
    [
        (None, "does not state its site protocol"),
        ("0", "Upgrade the site worker to a release that speaks site protocol 1"),
        ("2", "Upgrade the central server, or run a site worker release"),
        ("one", "must be a whole number"),
    ],
)
def test_an_incompatible_protocol_is_refused_saying_what_to_upgrade(cast, sent, says):
    _credential, token, _key = make_credential(cast)
    client = site_client(token, protocol=sent)
    for response in (
        client.get(f"{V1}whoami/"),
        client.post(f"{V1}heartbeat/", BEAT, format="json"),
    ):
        assert response.status_code == 426, response.content
        body = response.json()
        assert body["code"] == "protocol_mismatch"
        assert says in body["detail"]
    assert not SiteWorkerStatus.objects.exists()


def test_the_token_is_checked_before_the_protocol(cast):
    """A browser session or a wrong token hears about the token, whatever its protocol."""
    client = APIClient()
    client.force_login(cast.steward)
    assert client.get(f"{V1}whoami/").json()["code"] == "not_authenticated"
    stranger = site_client("fls_not-a-real-token", protocol=None)
    assert stranger.get(f"{V1}whoami/").status_code == 401


def test_protocol_refusal_accepts_only_what_this_server_speaks():
    assert protocol_refusal(str(SITE_PROTOCOL)) is None
    assert protocol_refusal(f" {SITE_PROTOCOL} ") is None
    assert protocol_refusal("") and protocol_refusal("-1") and protocol_refusal("99")


# --- whoami and the registered data sets ---------------------------------------------------------


def test_whoami_names_the_registered_public_key(cast):
    _credential, token, public_pem = make_credential(cast)
    body = site_client(token).get(f"{V1}whoami/").json()
    assert body["public_key"].strip() == public_pem.strip()
    assert body["institution"] == cast.hospital_a.slug


def test_a_site_lists_its_own_registered_data_sets_only(cast):
    offer_dataset(cast, cast.hospital_a, key="tumours", num_records=120, input_shape=(8,))
    offer_dataset(cast, cast.hospital_a, key="scans", modality="image", input_shape=(1, 8, 8))
    offer_dataset(cast, cast.hospital_b, key="other-site", num_records=5)
    _credential, token, _key = make_credential(cast)
    body = site_client(token).get(f"{V1}datasets/").json()
    assert [d["key"] for d in body] == ["scans", "tumours"]
    tumours = body[1]
    assert tumours == {
        "key": "tumours",
        "modality": "tabular",
        "num_records": 120,
        "input_shape": [8],
        "n_classes": tumours["n_classes"],
    }


# --- The heartbeat -------------------------------------------------------------------------------


def test_a_heartbeat_is_stored_and_shows_the_worker_online(cast):
    credential, token, _key = make_credential(cast)
    client = site_client(token)
    before = timezone.now()
    response = client.post(f"{V1}heartbeat/", {**BEAT, "uptime_seconds": 12.5}, format="json")
    assert response.status_code == 200, response.content
    status = SiteWorkerStatus.objects.get(credential=credential)
    assert (status.version, status.device, status.hostname) == (
        "0.1.0",
        "cuda:NVIDIA H200",
        "gpu-1",
    )
    assert status.protocol == SITE_PROTOCOL and status.interval_seconds == 30
    assert status.last_seen_at >= before
    assert abs((status.last_seen_at - status.started_at).total_seconds() - 12.5) < 0.01
    body = response.json()
    online_until = dt.datetime.fromisoformat(body["online_until"].replace("Z", "+00:00"))
    assert online_until - status.last_seen_at == dt.timedelta(seconds=MISSED_BEATS * 30)

    workers = site_workers([cast.hospital_a.pk])[cast.hospital_a.pk]
    assert workers.online and workers.label == "online"
    assert workers.latest.device_kind == "CUDA" and workers.latest.version == "0.1.0"

    # The next beat updates the same row: one per credential.
    again = client.post(
        f"{V1}heartbeat/", {**BEAT, "device": "cpu", "version": "0.2.0"}, format="json"
    )
    assert again.status_code == 200
    assert SiteWorkerStatus.objects.count() == 1
    status.refresh_from_db()
    assert (status.device, status.version) == ("cpu", "0.2.0")


def test_a_heartbeat_needs_a_live_site_token(cast):
    credential, token, _key = make_credential(cast)
    anonymous = APIClient()
    anonymous.credentials(HTTP_X_SITE_PROTOCOL=str(SITE_PROTOCOL))
    assert anonymous.post(f"{V1}heartbeat/", BEAT, format="json").status_code == 401
    browser = APIClient()
    browser.force_login(cast.admin)
    assert browser.post(f"{V1}heartbeat/", BEAT, format="json").status_code == 401
    credentials.site_credential_revoke(acting_user=cast.inst_admin, credential=credential)
    refused = site_client(token).post(f"{V1}heartbeat/", BEAT, format="json")
    assert refused.status_code == 401
    assert "revoked" in refused.json()["detail"]
    assert not SiteWorkerStatus.objects.exists()


@pytest.mark.parametrize(
    "change, field",
    [
        ({"device": "gpu"}, "device"),
        ({"device": "cuda:"}, "device"),
        ({"version": ""}, "version"),
        ({"version": "1.0 beta; drop"}, "version"),
        ({"interval_seconds": 1}, "interval_seconds"),
        ({"interval_seconds": 100000}, "interval_seconds"),
        ({"hostname": "h" * 300}, "hostname"),
        ({"uptime_seconds": -3}, "uptime_seconds"),
    ],
)
def test_a_malformed_heartbeat_is_400_naming_the_field(cast, change, field):
    _credential, token, _key = make_credential(cast)
    response = site_client(token).post(f"{V1}heartbeat/", {**BEAT, **change}, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()
    assert not SiteWorkerStatus.objects.exists()


def test_a_heartbeat_without_its_required_fields_is_400(cast):
    _credential, token, _key = make_credential(cast)
    response = site_client(token).post(f"{V1}heartbeat/", {"hostname": "x"}, format="json")
    assert response.status_code == 400
    assert {"version", "device", "interval_seconds"} <= set(response.json())


# --- Online or not -------------------------------------------------------------------------------


def _beat(credential, *, ago: float, interval: int = 30, device: str = "cpu"):
    worker_heartbeat_record(
        credential=credential,
        protocol=SITE_PROTOCOL,
        version="0.1.0",
        device=device,
        interval_seconds=interval,
    )
    SiteWorkerStatus.objects.filter(credential=credential).update(
        last_seen_at=timezone.now() - dt.timedelta(seconds=ago)
    )


def test_a_worker_is_online_within_three_of_its_intervals(cast):
    credential, _token, _key = make_credential(cast)
    _beat(credential, ago=MISSED_BEATS * 30 - 5)
    assert site_workers([cast.hospital_a.pk])[cast.hospital_a.pk].online
    _beat(credential, ago=MISSED_BEATS * 30 + 5)
    workers = site_workers([cast.hospital_a.pk])[cast.hospital_a.pk]
    assert not workers.online
    assert (workers.label, workers.tone) == ("offline", "bad")
    # Its own interval counts: a worker that beats every 10 minutes is online after 20.
    _beat(credential, ago=20 * 60, interval=600)
    assert site_workers([cast.hospital_a.pk])[cast.hospital_a.pk].online


def test_never_seen_no_credentials_and_revoked_workers(cast):
    seen, _t, _k = make_credential(cast, label="seen")
    never, _t, _k = make_credential(cast, label="never")
    revoked, _t, _k = make_credential(cast, label="revoked")
    _beat(seen, ago=7200)
    _beat(revoked, ago=1)
    credentials.site_credential_revoke(acting_user=cast.inst_admin, credential=revoked)
    found = site_workers([cast.hospital_a.pk, cast.hospital_b.pk])
    a = found[cast.hospital_a.pk]
    assert [w.label for w in a.workers] == ["seen", "never"]  # revoked: not listed
    assert not a.online and a.label == "offline"
    assert not a.workers[1].seen
    b = found[cast.hospital_b.pk]
    assert (b.label, b.tone, b.workers) == ("no worker credentials", "warn", ())
    assert a.latest.label == "seen"


def test_online_workers_come_first(cast):
    old, _t, _k = make_credential(cast, label="old")
    live, _t, _k = make_credential(cast, label="live")
    _beat(old, ago=3600)
    _beat(live, ago=1, device="cuda:A100")
    workers = site_workers([cast.hospital_a.pk])[cast.hospital_a.pk]
    assert workers.online and workers.latest.label == "live"
    assert workers.sort_key < site_workers([cast.hospital_b.pk])[cast.hospital_b.pk].sort_key
