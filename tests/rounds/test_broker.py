"""The embedded broker (consortium.broker): a consumer never sees a half-written message."""

from __future__ import annotations

import threading
import uuid
from unittest import mock

import pytest
from kombu import Connection, Exchange, Queue

from consortium.broker import Transport
from consortium.celery import app  # noqa: F401 - registers the transport alias


def _connection(folder):
    for name in ("out", "processed", "control"):
        (folder / name).mkdir(parents=True, exist_ok=True)
    return Connection(
        "filesystem://",
        transport_options={
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
        },
    )


def test_filesystem_urls_use_the_atomic_transport(tmp_path):
    with _connection(tmp_path) as conn:
        assert isinstance(conn.transport, Transport)


def test_messages_arrive_whole_while_a_consumer_polls(tmp_path):
    # kombu keeps the filesystem transport's bindings in one state per process as well as
    # in the folder: a name no other test binds, so the binding is written to this folder.
    name = f"test-{uuid.uuid4().hex[:12]}"
    queue = Queue(name, Exchange(name), routing_key=name)
    body = {"payload": "x" * 50_000}
    sent, received, errors = 200, [], []
    stop = threading.Event()

    def consume():
        with _connection(tmp_path) as conn:
            channel = conn.channel()
            queue(channel).declare()
            while not stop.is_set() or len(received) < sent:
                try:
                    message = channel.basic_get(name, no_ack=True)
                except Exception as exc:  # a partial file fails to decode here
                    errors.append(exc)
                    return
                if message is not None:
                    received.append(message.decode())

    with _connection(tmp_path) as conn:
        queue(conn.channel()).declare()
        reader = threading.Thread(target=consume)
        reader.start()
        with conn.Producer() as producer:
            for _ in range(sent):
                producer.publish(body, exchange=queue.exchange, routing_key=name)
        stop.set()
        reader.join(timeout=30)
    assert not errors, errors
    assert len(received) == sent and all(m == body for m in received)
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".tmp-")]


def _worker_conf(**transport):
    from types import SimpleNamespace

    return SimpleNamespace(broker_transport_options=transport, task_default_queue="central")


def test_the_coordinator_polls_the_embedded_broker_faster_than_the_sites(settings):
    """The coordinator's pick-up of a round's last upload is on every round's critical path;
    ten site workers polling as fast would burn the cores (docs/performance.md)."""
    from consortium.celery import _coordinator_polls_faster

    settings.EMBEDDED_BROKER_CENTRAL_POLL_SECONDS = 0.01
    for queues in ("central", ["central"], "site.a,central", None):
        conf = _worker_conf(polling_interval=0.05, store_processed=False)
        _coordinator_polls_faster(conf=conf, options={"queues": queues})
        assert conf.broker_transport_options == {"polling_interval": 0.01, "store_processed": False}
    # A coordinator that scores too (a tiny consortium's choice) polls at the coordinator's pace.
    both = _worker_conf(polling_interval=0.05)
    _coordinator_polls_faster(conf=both, options={"queues": "central,scoring"})
    assert both.broker_transport_options == {"polling_interval": 0.01}
    # A site worker, and the scoring worker (nothing waits on its pick-up), keep the slow pace.
    for queues in ("site.hospital-a", "scoring", ["scoring"]):
        other = _worker_conf(polling_interval=0.05)
        _coordinator_polls_faster(conf=other, options={"queues": queues})
        assert other.broker_transport_options == {"polling_interval": 0.05}
    redis = _worker_conf()  # no polling: nothing to change
    _coordinator_polls_faster(conf=redis, options={"queues": "central"})
    assert redis.broker_transport_options == {}


def _scoring_worker_starts(settings, queues, *, niceness=10, session_leader=True):
    """Run the scoring-priority handler as a worker started on ``queues`` would; the mocks of
    ``os.nice`` and of the autogroup's path, to see what it lowered."""
    from consortium.celery import _scoring_runs_behind_the_rounds

    settings.SCORING_WORKER_NICENESS = niceness
    with (
        mock.patch("consortium.celery.os.nice") as nice,
        mock.patch("consortium.celery.Path") as path,
        mock.patch("consortium.celery.os.getsid", return_value=4242 if session_leader else 1),
        mock.patch("consortium.celery.os.getpid", return_value=4242),
    ):
        _scoring_runs_behind_the_rounds(options={"queues": queues})
    return nice, path


@pytest.mark.parametrize(
    ("queues", "lowered"),
    [
        ("scoring", True),
        (["scoring"], True),
        ("central,scoring", False),  # a coordinator that scores too: its rounds would wait
        ("central", False),
        ("site.hospital-a", False),
        (None, False),  # no -Q: the default queue, the coordinator's
    ],
)
def test_only_a_worker_of_the_scoring_queue_alone_runs_behind_the_rounds(settings, queues, lowered):
    nice, path = _scoring_worker_starts(settings, queues)
    assert nice.call_args_list == ([mock.call(10)] if lowered else [])
    # The session it leads ranks lower too (the kernel's autogroup), or nice alone does nothing
    # against the processes of other sessions.
    if lowered:
        path.assert_called_once_with("/proc/self/autogroup")
        path.return_value.write_text.assert_called_once_with("10\n")
    else:
        path.assert_not_called()


def test_a_scoring_worker_in_someone_elses_session_leaves_the_session_alone(settings):
    """Started from a shell beside other processes, lowering the session would slow them."""
    nice, path = _scoring_worker_starts(settings, "scoring", session_leader=False)
    nice.assert_called_once_with(10)
    path.assert_not_called()


def test_a_scoring_worker_keeps_its_priority_when_told_to(settings):
    nice, path = _scoring_worker_starts(settings, "scoring", niceness=0)
    nice.assert_not_called()
    path.assert_not_called()
