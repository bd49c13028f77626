"""How many messages wait in each broker queue, through kombu, whatever the broker.

One code path for the three brokers the platform runs on: a passive ``queue_declare`` per
queue, which declares nothing and answers the queue's message count. kombu implements it per
transport: on RabbitMQ it is AMQP's own passive declare (an undeclared queue answers
NOT_FOUND, read here as 0: nothing ever waited there); on Redis, ``LLEN`` of the queue's keys
(one per priority step) in one pipeline, and an empty queue, which Redis does not keep, is
NOT_FOUND too; on the embedded filesystem broker, the message files named for the queue in
its folder (``consortium.broker``).

A broker that does not answer within :data:`TIMEOUT_SECONDS` gives ``up=False`` and no
depths, never an exception: the scrape that asked still answers, saying the broker is down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from kombu import Connection

__all__ = ["TIMEOUT_SECONDS", "BrokerDepths", "broker_config", "queue_depths"]

logger = logging.getLogger(__name__)

#: Seconds a scrape waits for the broker (connecting, then each answer).
TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class BrokerDepths:
    """The broker's answer: whether it answered, and the messages waiting per queue."""

    up: bool
    depths: dict[str, int] = field(default_factory=dict)
    error: str = ""


def broker_config() -> tuple[str, dict]:
    """The broker URL and transport options this process's Celery app uses."""
    from consortium.celery import app  # on use: only the scrape needs the Celery app

    return app.conf.broker_url, dict(app.conf.broker_transport_options or {})


def queue_depths(
    queues: list[str], *, url: str | None = None, options: dict | None = None
) -> BrokerDepths:
    """The number of messages waiting in each of ``queues`` (a :class:`BrokerDepths`). The
    broker is the Celery app's unless ``url`` (and ``options``) name another."""
    if url is None:
        url, options = broker_config()
    options = dict(options or {})
    if url.startswith(("redis://", "rediss://")):
        options = {
            **options,
            "socket_timeout": TIMEOUT_SECONDS,
            "socket_connect_timeout": TIMEOUT_SECONDS,
        }
    depths: dict[str, int] = {}
    try:
        with Connection(url, transport_options=options, connect_timeout=TIMEOUT_SECONDS) as conn:
            conn.ensure_connection(max_retries=1, timeout=TIMEOUT_SECONDS)
            for queue in queues:
                depths[queue] = _depth(conn, queue)
    except Exception as exc:  # noqa: BLE001 - any failure of the broker is "down", said once
        error = f"{type(exc).__name__}: {exc}"[:300]
        logger.warning("metrics: the broker did not answer: %s", error)
        return BrokerDepths(up=False, error=error)
    return BrokerDepths(up=True, depths=depths)


def _depth(conn: Connection, queue: str) -> int:
    channel = conn.channel()
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except conn.channel_errors:
        return 0  # NOT_FOUND: never declared (RabbitMQ) or empty (Redis)
    finally:
        try:
            channel.close()
        except conn.connection_errors + conn.channel_errors:
            pass  # RabbitMQ closed it already with the NOT_FOUND
