"""Queue depths from the brokers themselves: the embedded filesystem broker (always), Redis
(when one answers on this machine: the CI's PostgreSQL pass has one), RabbitMQ (marked
``rabbitmq``, in a throwaway virtual host), and one that is down."""

from __future__ import annotations

import time
import uuid

import pytest
from kombu import Connection

import consortium.celery  # noqa: F401 - registers the embedded broker's transport
from consortium.observability.queues import queue_depths
from tests.support.rabbitmq import Vhost, require_rabbitmq


def _publish(url, options, counts: dict[str, int]) -> None:
    with Connection(url, transport_options=options) as conn:
        producer = conn.Producer()
        for queue, count in counts.items():
            conn.SimpleQueue(queue)  # declared as Celery declares it (Redis: bindings)
            for i in range(count):
                producer.publish({"i": i}, routing_key=queue, exchange="", declare=[])


def test_the_embedded_broker_counts_each_queues_files(tmp_path):
    folder = tmp_path / "broker"
    for sub in ("out", "processed", "control"):
        (folder / sub).mkdir(parents=True)
    options = {
        "data_folder_in": str(folder / "out"),
        "data_folder_out": str(folder / "out"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
    }
    _publish("filesystem://", options, {"central": 3, "site.barts": 2})
    answer = queue_depths(
        ["central", "site.barts", "site.kings"], url="filesystem://", options=options
    )
    assert answer.up
    assert answer.depths == {"central": 3, "site.barts": 2, "site.kings": 0}


def _redis_url() -> str:
    import redis

    url = "redis://127.0.0.1:6379/14"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379 (the CI's PostgreSQL pass has one)")
    return url


def test_redis_counts_each_queues_list():
    url = _redis_url()
    prefix = f"obs-{uuid.uuid4().hex[:8]}"
    central, site = f"{prefix}.central", f"{prefix}.site.barts"
    try:
        _publish(url, {}, {central: 4, site: 1})
        answer = queue_depths([central, site, f"{prefix}.site.none"], url=url, options={})
        assert answer.up
        assert answer.depths == {central: 4, site: 1, f"{prefix}.site.none": 0}
    finally:
        import redis

        client = redis.Redis.from_url(url)
        for key in client.scan_iter(f"*{prefix}*"):
            client.delete(key)


def test_a_broker_that_is_down_answers_down_quickly():
    started = time.monotonic()
    answer = queue_depths(["central"], url="redis://127.0.0.1:1/0", options={})
    assert not answer.up
    assert answer.depths == {}
    assert "Error" in answer.error
    assert time.monotonic() - started < 15


@pytest.mark.rabbitmq
def test_rabbitmq_counts_each_queues_messages_and_declares_nothing():
    require_rabbitmq()
    vhost = Vhost()
    try:
        url = vhost.url()
        _publish(url, {}, {"central": 2, "site.barts": 3})
        answer = queue_depths(["central", "site.barts", "site.kings"], url=url, options={})
        assert answer.up
        # site.kings was never declared: NOT_FOUND reads 0, and asking did not declare it.
        assert answer.depths == {"central": 2, "site.barts": 3, "site.kings": 0}
        assert "site.kings" not in vhost.names("queues")
    finally:
        vhost.remove()
