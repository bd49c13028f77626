"""The embedded broker (consortium.broker): a consumer never sees a half-written message."""

from __future__ import annotations

import threading
import uuid

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
