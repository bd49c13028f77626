"""``run_site_worker --check`` and the same checks at the worker's start, against a real central
server (pytest-django's live server, behind an HTTPS front with a private CA where TLS is the
point), with a hospital's real credentials, signing key and CSV data (``make_consortium3``).

The worker's settings (``SITE_CA_BUNDLE``, ``SITE_HEARTBEAT_SECONDS``) are read by
``WorkerConfig``; the start path runs its checks in a subprocess (torch stays out of the
worker's parent) and, once Celery says the worker is ready, sends heartbeats.
"""

from __future__ import annotations

import dataclasses
import time
import uuid

import kombu
import pytest
from celery import signals
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.support.rabbitmq import ADMIN_URL, require_rabbitmq
from tests.support.tls import HTTPSFront, make_tls_files
from training.fl.signing import generate_keypair
from training.management.commands import run_site_worker as command
from training.models import SiteCredential, SiteWorkerStatus
from training.rounds import credentials
from training.site import checks as site_checks
from training.site import client as site_client
from training.site.client import WorkerConfig, WorkerConfigError

#: The tests with a live server: its thread must see what the test wrote.
live = pytest.mark.django_db(transaction=True)

#: This machine's RabbitMQ (the house rules: a real broker where it matters).
RABBITMQ_URL = ADMIN_URL
CHECKS = ["central", "protocol", "token", "signing key", "ledger", "broker", "data breast-cancer"]


@pytest.fixture
def site(c3, live_server, monkeypatch, settings):
    """Hospital A's worker environment, pointed at the live server, on the embedded broker."""
    a = c3.site("hospital-a")
    for name, value in a.env(live_server.url).items():
        monkeypatch.setenv(name, value)
    for name in ("SITE_CA_BUNDLE", "SITE_HEARTBEAT_SECONDS", "CELERY_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CENTRAL_TIMEOUT", "10")
    settings.CELERY_BROKER_URL = "filesystem://"
    return a


def run_check(capsys) -> tuple[bool, dict[str, str], str]:
    """``--check``: (passed, {check name: its line}, the whole output)."""
    passed = True
    try:
        call_command("run_site_worker", "--check")
    except CommandError as exc:
        passed = False
        assert "checks failed" in str(exc)
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        if line.startswith("["):
            name = line[7:].split(":", 1)[0]
            lines[name] = line
    return passed, lines, out


@live
def test_every_check_passes_for_a_site_set_up_right(site, capsys):
    passed, lines, out = run_check(capsys)
    assert passed, out
    assert list(lines) == CHECKS
    assert all(line.startswith("[ok  ]") for line in lines.values()), out
    assert "plain HTTP" in lines["central"]
    assert "site hospital-a" in lines["token"]
    assert (
        f"{site.num_records} records (registered {site.num_records}), shape [30]"
        in (lines["data breast-cancer"])
    )
    assert "embedded broker" in lines["broker"]
    assert "device: cpu" in out and "all 7 checks passed" in out


@live
def test_tls_verifies_with_the_private_ca_given_in_site_ca_bundle(
    site, live_server, tmp_path, monkeypatch, capsys
):
    files = make_tls_files(tmp_path / "tls")
    with HTTPSFront(files, live_server.url) as front:
        monkeypatch.setenv("CENTRAL_URL", front.url)
        monkeypatch.setenv("SITE_CA_BUNDLE", str(files.ca))
        passed, lines, out = run_check(capsys)
        assert passed, out
        assert f"TLS verified against SITE_CA_BUNDLE={files.ca}" in lines["central"]

        # Without the bundle, the system's authorities do not know this CA: said, with the fix.
        monkeypatch.delenv("SITE_CA_BUNDLE")
        passed, lines, out = run_check(capsys)
        assert not passed
        assert lines["central"].startswith("[FAIL] central")
        assert "does not verify" in lines["central"]
        assert "set SITE_CA_BUNDLE" in lines["central"]
        assert lines["token"].startswith("[skip]")

        # Another CA's bundle does not verify it either.
        other = make_tls_files(tmp_path / "other", ca_name="Another CA")
        monkeypatch.setenv("SITE_CA_BUNDLE", str(other.ca))
        passed, lines, _out = run_check(capsys)
        assert not passed
        assert (
            f"does not verify against the CA bundle SITE_CA_BUNDLE={other.ca}" in (lines["central"])
        )


@live
def test_each_misconfiguration_is_named(site, c3, monkeypatch, tmp_path, capsys):
    # A signing key that is not the registered one.
    wrong_key = tmp_path / "wrong.pem"
    wrong_key.write_bytes(generate_keypair()[0])
    monkeypatch.setenv("SITE_SIGNING_KEY", str(wrong_key))
    passed, lines, _out = run_check(capsys)
    assert not passed
    assert lines["signing key"].startswith("[FAIL]")
    assert "not the private key of the public key registered" in lines["signing key"]
    assert lines["token"].startswith("[ok  ]") and lines["data breast-cancer"].startswith("[ok")
    monkeypatch.setenv("SITE_SIGNING_KEY", str(site.key_path))

    # Another site's token.
    monkeypatch.setenv("SITE_TOKEN", c3.site("hospital-b").token)
    _passed, lines, _out = run_check(capsys)
    assert (
        "SITE_TOKEN belongs to site 'hospital-b', but SITE_SLUG is 'hospital-a'" in (lines["token"])
    )
    assert lines["signing key"].startswith("[skip]")

    # A revoked token.
    credential = SiteCredential.objects.get(institution__slug="hospital-a")
    credentials.site_credential_revoke(acting_user=c3.scene.cast.admin, credential=credential)
    monkeypatch.setenv("SITE_TOKEN", site.token)
    _passed, lines, _out = run_check(capsys)
    assert lines["token"].startswith("[FAIL] token: SITE_TOKEN refused")
    assert "revoked" in lines["token"]


@live
def test_the_data_must_match_what_the_site_registered(site, capsys):
    csv_path = site.data_root / "breast-cancer.csv"
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(rows[:-10]) + "\n")  # ten records fewer than registered
    _passed, lines, _out = run_check(capsys)
    assert lines["data breast-cancer"].startswith("[FAIL]")
    assert (
        f"{site.num_records - 10} records, fewer than the {site.num_records} registered"
        in (lines["data breast-cancer"])
    )

    # One feature short: the shape differs.
    csv_path.write_text("\n".join(",".join(r.split(",")[1:]) for r in rows) + "\n")
    _passed, lines, _out = run_check(capsys)
    assert "one input has shape [29], registered [30]" in lines["data breast-cancer"]

    csv_path.unlink()
    _passed, lines, _out = run_check(capsys)
    assert lines["data breast-cancer"].startswith("[FAIL] data breast-cancer: not loadable")
    assert (
        f"breast-cancer.csv or breast-cancer/images.npy under {site.data_root}"
        in (lines["data breast-cancer"])
    )


@live
def test_a_worker_of_another_protocol_is_told_what_to_upgrade(site, monkeypatch, capsys):
    monkeypatch.setattr(site_client, "SITE_PROTOCOL", 2)
    passed, lines, _out = run_check(capsys)
    assert not passed
    assert lines["central"].startswith("[ok  ]")
    assert lines["protocol"].startswith("[FAIL]")
    assert "Upgrade the central server" in lines["protocol"]


# --- The broker ----------------------------------------------------------------------------------


def _config(tmp_path, central_url: str) -> WorkerConfig:
    key = tmp_path / "k.pem"
    key.write_bytes(generate_keypair()[0])
    return WorkerConfig(
        site_slug="north",
        central_url=central_url,
        token="fls_x",
        signing_key_path=key,
        data_root=tmp_path,
    )


@pytest.mark.parametrize("broker_url", ["", "filesystem://", "filesystem:///var/broker"])
def test_the_embedded_broker_is_refused_when_the_central_server_is_elsewhere(tmp_path, broker_url):
    remote = site_checks.check_broker(_config(tmp_path, "https://fl.example.org"), broker_url)
    assert remote.status == "failed"
    assert "Set CELERY_BROKER_URL" in remote.message
    assert "CENTRAL_URL (https://fl.example.org) is another machine" in remote.message
    for local in ("http://127.0.0.1:8000", "http://localhost:8101"):
        assert site_checks.check_broker(_config(tmp_path, local), broker_url).ok


@pytest.mark.rabbitmq
def test_the_broker_check_logs_in_with_the_sites_account_on_rabbitmq(tmp_path):
    """This machine's RabbitMQ: an account that can consume the queue passes, a refused login
    fails saying so, without the password."""
    require_rabbitmq()
    config = dataclasses.replace(
        _config(tmp_path, "https://fl.example.org"), site_slug=f"checks-{uuid.uuid4().hex[:8]}"
    )
    queue = f"site.{config.site_slug}"
    try:
        passed = site_checks.check_broker(config, RABBITMQ_URL)
        assert passed.ok, passed.message
        assert f"user 'guest' can consume {queue} on amqp://127.0.0.1:5672" == passed.message

        refused = site_checks.check_broker(config, "amqp://guest:not-the-password@127.0.0.1:5672//")
        assert refused.status == "failed"
        assert "refused the login of user 'guest'" in refused.message
        assert "not-the-password" not in refused.message
    finally:
        with kombu.Connection(RABBITMQ_URL) as conn:
            conn.default_channel.queue_delete(queue)
            conn.default_channel.exchange_delete(queue)


def test_a_worker_refuses_to_start_when_a_check_fails(c3, monkeypatch, capsys):
    """The real start path: its checks run in a subprocess; a remote CENTRAL_URL on the
    embedded broker fails two of them, and the Celery worker is never started."""
    for name, value in c3.site("hospital-a").env("https://central.invalid").items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CELERY_BROKER_URL", raising=False)
    monkeypatch.setenv("CENTRAL_TIMEOUT", "3")
    monkeypatch.setattr(command, "CENTRAL_WAIT_SECONDS", 1)
    started = []
    monkeypatch.setattr(command.app, "worker_main", lambda argv: started.append(argv))
    with pytest.raises(
        CommandError, match=r"does not start: 2 check\(s\) failed \(central, broker\)"
    ):
        call_command("run_site_worker", "--pool", "prefork")
    out = capsys.readouterr().out
    assert "waiting up to 1 s for the central server to answer" in out
    assert "[FAIL] central" in out and "[FAIL] broker" in out
    assert "Set CELERY_BROKER_URL" in out
    assert started == []


@live
def test_a_worker_starts_after_its_checks_and_reports_online(site, monkeypatch, capsys):
    """The start path against the live server: checks pass (in a subprocess), the worker
    starts, and once Celery says it is ready its heartbeat reaches the central server."""
    monkeypatch.setenv("SITE_HEARTBEAT_SECONDS", "5")
    beats = []

    class Recorded(command.Heartbeat):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            beats.append(self)

    def fake_worker_main(argv):
        signals.worker_ready.send(sender=None)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not beats[0].beats:
            time.sleep(0.05)
        signals.worker_shutdown.send(sender=None)
        fake_worker_main.argv = argv

    monkeypatch.setattr(command.app, "worker_main", fake_worker_main)
    monkeypatch.setattr(command, "Heartbeat", Recorded)
    disconnects = []
    real_connect = command.start_on_worker_ready
    monkeypatch.setattr(
        command, "start_on_worker_ready", lambda hb: disconnects.append(real_connect(hb))
    )
    try:
        call_command("run_site_worker", "--pool", "prefork")
    finally:
        for disconnect in disconnects:
            disconnect()
    out = capsys.readouterr().out
    assert "[FAIL]" not in out, out
    assert "heartbeat every 5 s" in out and "device cpu" in out
    assert fake_worker_main.argv[:3] == ["worker", "-Q", "site.hospital-a"]
    assert beats[0].beats >= 1
    status = SiteWorkerStatus.objects.get(credential__institution__slug="hospital-a")
    assert status.device == "cpu" and status.interval_seconds == 5
    assert status.version and status.hostname


class _Central:
    """A client whose central server answers nothing ``silent`` times, then ``then``."""

    def __init__(self, silent: int, then: site_client.CentralError | None = None):
        self.silent, self.then, self.calls = silent, then, 0

    def whoami(self):
        self.calls += 1
        if self.calls <= self.silent:
            raise site_client.CentralError("no answer from the server (refused)")
        if self.then is not None:
            raise self.then
        return {}


def test_a_starting_worker_waits_for_its_central_server_only_while_it_does_not_answer():
    said = []
    late = _Central(silent=2)
    assert site_checks.wait_for_central(late, limit=10, every=0.01, say=said.append)
    assert late.calls == 3 and len(said) == 1 and "waiting up to 10 s" in said[0]
    # A refusal or a certificate that does not verify is an answer: the checks report it.
    refusing = _Central(silent=0, then=site_client.CentralError("401", status=401))
    assert site_checks.wait_for_central(refusing, limit=10, every=0.01)
    assert refusing.calls == 1
    untrusted = _Central(silent=0, then=site_client.CentralError("TLS", tls=True))
    assert site_checks.wait_for_central(untrusted, limit=10, every=0.01)
    gone = _Central(silent=10**6)
    assert not site_checks.wait_for_central(gone, limit=0.05, every=0.01)


def test_a_heartbeat_that_does_not_go_through_is_retried_not_raised(tmp_path):
    client = site_client.CentralClient(
        dataclasses.replace(_config(tmp_path, "http://127.0.0.1:9"), timeout=2)
    )
    heartbeat = command.Heartbeat(client, device="cpu", interval=5)
    assert heartbeat.beat() is False
    assert heartbeat.beats == 0


# --- The worker's settings -----------------------------------------------------------------------


def _env(tmp_path, **extra) -> dict:
    key = tmp_path / "k.pem"
    key.write_bytes(generate_keypair()[0])
    return {
        "SITE_SLUG": "north",
        "CENTRAL_URL": "https://fl.example.org",
        "SITE_TOKEN": "fls_x",
        "SITE_SIGNING_KEY": str(key),
        "DATA_ROOT": str(tmp_path),
        **extra,
    }


def test_site_ca_bundle_must_be_a_readable_pem_file(tmp_path):
    with pytest.raises(WorkerConfigError, match="SITE_CA_BUNDLE: no file at"):
        WorkerConfig.from_env(_env(tmp_path, SITE_CA_BUNDLE=str(tmp_path / "missing.pem")))
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("this is no certificate\n")
    with pytest.raises(WorkerConfigError, match="holds no usable PEM certificate"):
        WorkerConfig.from_env(_env(tmp_path, SITE_CA_BUNDLE=str(not_pem)))
    files = make_tls_files(tmp_path / "tls")
    config = WorkerConfig.from_env(_env(tmp_path, SITE_CA_BUNDLE=str(files.ca)))
    assert config.ca_bundle == files.ca
    assert WorkerConfig.from_env(_env(tmp_path)).ca_bundle is None


@pytest.mark.parametrize(
    "value, expected",
    [("", 30.0), ("5", 5.0), ("120", 120.0), ("4", "between 5 and 3600"), ("often", "number")],
)
def test_site_heartbeat_seconds(tmp_path, value, expected):
    env = _env(tmp_path, SITE_HEARTBEAT_SECONDS=value)
    if isinstance(expected, float):
        assert WorkerConfig.from_env(env).heartbeat_seconds == expected
    else:
        with pytest.raises(WorkerConfigError, match=expected):
            WorkerConfig.from_env(env)
