"""The site worker's client retries a task's requests through a central server that is
restarting (issue 13, item 4): no answer, 502, 503, 504 and 429 are retried with back-off and
full jitter, within CENTRAL_RETRY_SECONDS and the caller's deadline; every other answer is
raised at once, and when the budget is spent the last error is raised as it was.

The central server here is a tiny http.server in a thread that plays a script: for each
request in turn, close the connection without answering, answer an error, or answer 200.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from training.fl.signing import generate_keypair
from training.site import client as site_client
from training.site.client import CentralClient, CentralError, WorkerConfig, WorkerConfigError
from training.site.protocol import SITE_API_PATH

CLOSE = "close"  # close the connection without an answer


class _Script(BaseHTTPRequestHandler):
    """Answers each request with the next step of the server's script; the last step repeats.
    A step is CLOSE, a status, or (status, headers, body)."""

    protocol_version = "HTTP/1.1"

    def _handle(self):
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        with server.lock:
            server.seen.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
            )
            step = server.script[min(len(server.seen) - 1, len(server.script) - 1)]
        if step == CLOSE:
            self.close_connection = True
            return
        status, headers, payload = step if isinstance(step, tuple) else (step, {}, None)
        if payload is None:
            payload = {"ok": True} if status < 400 else {"detail": f"HTTP {status}", "code": "x"}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle

    def log_message(self, *args):  # quiet
        pass


class Central:
    """The scripted server on 127.0.0.1; ``port`` may be given to start it where one stopped."""

    def __init__(self, script, port: int = 0):
        self.server = ThreadingHTTPServer(("127.0.0.1", port), _Script)
        self.server.daemon_threads = True
        self.server.script = list(script)
        self.server.seen = []
        self.server.lock = threading.Lock()
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def seen(self) -> list[dict]:
        return self.server.seen

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def central():
    started = []

    def start(script, port: int = 0) -> Central:
        server = Central(script, port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def key(tmp_path):
    path = tmp_path / "k.pem"
    path.write_bytes(generate_keypair()[0])
    return path


def _client(url, key, tmp_path, **options) -> CentralClient:
    config = WorkerConfig(
        site_slug="north",
        central_url=url,
        token="fls_x",
        signing_key_path=key,
        data_root=tmp_path,
        timeout=5,
    )
    options.setdefault("base_delay", 0.01)
    options.setdefault("max_delay", 0.05)
    return CentralClient(config, **options)


def _upload(client, **extra):
    return client.upload(
        7,
        2,
        data=b"\x00update-bytes\xff" * 100,
        digest="d" * 64,
        signature="c2ln",
        samples=42,
        metrics={"loss": 0.5},
        privacy_events=[{"kind": "clip"}],
        pipeline=[{"name": "clip"}],
        **extra,
    )


# --- Transient failures are retried --------------------------------------------------------------


@pytest.mark.parametrize("failure", [CLOSE, 502, 503, 504])
def test_a_request_goes_through_after_transient_failures(central, key, tmp_path, failure, caplog):
    server = central([failure, failure, (200, {}, {"id": 7})])
    client = _client(server.url, key, tmp_path)
    with caplog.at_level(logging.WARNING, logger="training.site.client"):
        assert client.job(7) == {"id": 7}
    assert len(server.seen) == 3
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2
    assert "GET jobs/7/" in retries[0].getMessage()
    assert "retry 1 in" in retries[0].getMessage()
    assert "retry 2 in" in retries[1].getMessage()


def test_a_server_that_is_down_then_back_is_waited_for(central, key, tmp_path):
    """Connection refused while the web server restarts, then its answer."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}", key, tmp_path, base_delay=0.05, max_delay=0.1)
    restarted = []
    timer = threading.Timer(0.4, lambda: restarted.append(central([200], port=port)))
    timer.start()
    try:
        status, body = _upload(client)
    finally:
        timer.join()
    assert (status, body) == (200, {"ok": True})
    assert len(restarted[0].seen) == 1


def test_an_upload_retried_after_a_503_arrives_exactly_as_sent(central, key, tmp_path):
    server = central([503, CLOSE, (200, {}, {"duplicate": True})])
    client = _client(server.url, key, tmp_path)
    assert _upload(client) == (200, {"duplicate": True})
    assert len(server.seen) == 3
    first = server.seen[0]
    assert first["method"] == "POST"
    assert first["path"] == SITE_API_PATH + "jobs/7/rounds/2/update/"
    assert first["body"] == b"\x00update-bytes\xff" * 100
    assert first["headers"]["x-update-digest"] == "d" * 64
    assert first["headers"]["authorization"] == "Site fls_x"
    for again in server.seen[1:]:
        assert again["method"] == first["method"]
        assert again["path"] == first["path"]
        assert again["body"] == first["body"]
        assert again["headers"] == first["headers"]


def test_the_delays_back_off_with_full_jitter_up_to_the_cap(central, key, tmp_path):
    class Bounds:
        def __init__(self):
            self.asked = []

        def uniform(self, low, high):
            self.asked.append((low, high))
            return high / 2

    rng, slept = Bounds(), []
    server = central([503] * 7 + [200])
    client = CentralClient(
        _client(server.url, key, tmp_path).config, sleep=slept.append, rng=rng
    )  # the real constants: 0.5 s doubling, capped at 15 s
    assert client.round_model(7, 2).data == b'{"ok": true}'
    assert rng.asked == [(0.0, b) for b in (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0)]
    assert slept == [b / 2 for _low, b in rng.asked]
    assert len(server.seen) == 8


def test_the_jitter_is_random_and_seeded_from_the_os(key, tmp_path):
    client = _client("http://127.0.0.1:9", key, tmp_path)
    assert isinstance(client._rng, site_client.random.SystemRandom)


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_is_honoured(central, key, tmp_path, status):
    slept = []
    server = central([(status, {"Retry-After": "3"}, None), 200])
    client = _client(server.url, key, tmp_path, sleep=slept.append)
    assert client.evaluation_request(7, 2) == {"ok": True}
    assert slept == [3.0]
    assert len(server.seen) == 2


def test_a_retry_after_past_the_budget_gives_up_at_once(central, key, tmp_path):
    server = central([(429, {"Retry-After": "30"}, {"detail": "slow down"})])
    client = _client(server.url, key, tmp_path, retry_seconds=1, sleep=pytest.fail)
    with pytest.raises(CentralError) as raised:
        client.job(7)
    assert raised.value.status == 429
    assert raised.value.retry_after == 30.0
    assert len(server.seen) == 1


def test_a_retry_after_date_is_read():
    later = datetime.now(UTC) + timedelta(seconds=60)
    value = later.strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert 55 <= site_client._retry_after(value) <= 60
    assert site_client._retry_after("soon") is None
    assert site_client._retry_after(None) is None


# --- Answers are not retried ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "status, code", [(409, "already_uploaded"), (400, "bad_request"), (401, "x"), (404, "x")]
)
def test_an_answer_is_raised_at_once_not_retried(central, key, tmp_path, status, code):
    server = central([(status, {}, {"detail": "no", "code": code}), 200])
    client = _client(server.url, key, tmp_path, sleep=pytest.fail)
    with pytest.raises(CentralError) as raised:
        _upload(client)
    assert raised.value.status == status
    assert raised.value.body == {"detail": "no", "code": code}
    assert len(server.seen) == 1


def test_what_is_retried():
    assert site_client.retryable(CentralError("no answer"))
    assert not site_client.retryable(CentralError("bad certificate", tls=True))
    for status in (429, 502, 503, 504):
        assert site_client.retryable(CentralError("x", status=status))
    for status in (400, 401, 403, 404, 409, 413, 426, 500):
        assert not site_client.retryable(CentralError("x", status=status))


def test_checks_and_heartbeats_are_not_retried_here(central, key, tmp_path):
    """Their callers loop already, and a check must say at once that nothing answers."""
    server = central([503, 200])
    client = _client(server.url, key, tmp_path, sleep=pytest.fail)
    for call in (client.whoami, client.datasets, lambda: client.heartbeat({"x": 1})):
        with pytest.raises(CentralError) as raised:
            call()
        assert raised.value.status == 503
        server.seen.clear()


# --- The budget and the deadline -----------------------------------------------------------------


def test_the_budget_spent_raises_the_last_error(central, key, tmp_path):
    server = central([CLOSE, 502, (503, {}, {"detail": "restarting", "code": "down"})])
    client = _client(server.url, key, tmp_path, retry_seconds=0.3)
    started = time.monotonic()
    with pytest.raises(CentralError) as raised:
        _upload(client)
    assert time.monotonic() - started < 2
    assert raised.value.status == 503
    assert raised.value.body == {"detail": "restarting", "code": "down"}
    assert len(server.seen) >= 3


def test_no_answer_after_the_budget_is_raised_as_no_answer(key, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}", key, tmp_path, retry_seconds=0.2)
    with pytest.raises(CentralError) as raised:
        client.model(7, "a" * 64)
    assert raised.value.status == 0
    assert not raised.value.tls
    assert "no answer" in str(raised.value)


def test_a_zero_budget_never_retries(central, key, tmp_path):
    server = central([503, 200])
    client = _client(server.url, key, tmp_path, retry_seconds=0, sleep=pytest.fail)
    with pytest.raises(CentralError):
        client.job(7)
    assert len(server.seen) == 1


@pytest.mark.parametrize(
    "deadline",
    [
        lambda: time.time() - 1,
        lambda: datetime.now(UTC) - timedelta(seconds=1),
        lambda: (datetime.now(UTC) - timedelta(seconds=1)).isoformat().replace("+00:00", "Z"),
    ],
)
def test_no_retry_past_the_deadline(central, key, tmp_path, deadline):
    server = central([503, 200])
    client = _client(server.url, key, tmp_path, sleep=pytest.fail)
    with pytest.raises(CentralError) as raised:
        _upload(client, deadline=deadline())
    assert raised.value.status == 503
    assert len(server.seen) == 1


def test_a_deadline_ahead_bounds_the_retries(central, key, tmp_path):
    server = central([503])
    client = _client(server.url, key, tmp_path, retry_seconds=60)
    started = time.monotonic()
    with pytest.raises(CentralError):
        client.upload_evaluation(7, 2, report="r", signature="s", deadline=time.time() + 0.3)
    assert time.monotonic() - started < 2
    assert len(server.seen) >= 2


def test_a_deadline_without_a_time_zone_is_refused(key, tmp_path):
    client = _client("http://127.0.0.1:9", key, tmp_path)
    with pytest.raises(ValueError, match="time zone"):
        client.job(7, deadline=datetime(2030, 1, 1))


# --- The setting ---------------------------------------------------------------------------------


def _env(tmp_path, key, **extra) -> dict:
    return {
        "SITE_SLUG": "north",
        "CENTRAL_URL": "https://fl.example.org",
        "SITE_TOKEN": "fls_x",
        "SITE_SIGNING_KEY": str(key),
        "DATA_ROOT": str(tmp_path),
        **extra,
    }


def test_central_retry_seconds(tmp_path, key):
    assert WorkerConfig.from_env(_env(tmp_path, key)).retry_seconds == 120
    assert WorkerConfig.from_env(_env(tmp_path, key, CENTRAL_RETRY_SECONDS="0")).retry_seconds == 0
    config = WorkerConfig.from_env(_env(tmp_path, key, CENTRAL_RETRY_SECONDS="30"))
    assert CentralClient(config).retry_seconds == 30
    for bad in ("-1", "soon", "7200"):
        with pytest.raises(WorkerConfigError, match="CENTRAL_RETRY_SECONDS"):
            WorkerConfig.from_env(_env(tmp_path, key, CENTRAL_RETRY_SECONDS=bad))
