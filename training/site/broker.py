"""A site's own account on the consortium's broker: what it is allowed, and whether it works.

Hospitals do not trust one another's workers. With one broker account shared by every site, any
site could read another's tasks, delete its queue or publish to ``central`` (the coordinator's
queue). With RabbitMQ each site gets its own user, allowed to consume its own queue
``site.<slug>`` and nothing else (``manage.py site_broker_account`` creates it, or prints the
``rabbitmqctl`` lines). Redis has no such permissions in this layout: there, every site shares
one trust domain (README, "Distributed layout").

What a site worker needs, measured on RabbitMQ 3.10.8 with the flags of ``run_site_worker``
(``worker_argv``: no remote control, no events, gossip, mingle or heartbeats): it declares the
direct exchange ``site.<slug>`` and the durable queue ``site.<slug>`` (as Celery declares any
queue it consumes), binds one to the other and consumes the queue. RabbitMQ checks

* ``exchange.declare`` and ``queue.declare``: *configure* on the exchange, on the queue;
* ``queue.bind``: *write* on the queue and *read* on the exchange;
* ``basic.consume``: *read* on the queue (``basic.ack`` needs nothing).

The queue and its exchange share the name, so one regular expression per right,
``^site\\.<slug>$``, grants all of that and nothing more. Every other name is refused
(``ACCESS_REFUSED``): the queue ``site.<other>`` (consume, get, purge, delete, declare), the
exchange ``central``, the default exchange ``amq.default`` (publishing to any queue by name), and
what a worker with remote control, events or heartbeats would declare (``celery.pidbox``,
``<host>.celery.pidbox``, ``celeryev``): with those on, such an account fails, which is why the
site worker runs without them. The site worker publishes nothing: its tasks ignore their results
and no result backend is configured, so it needs no reply queue.

Two things the account can still do, both harmless: publish into its own exchange (the bind
needs *write* on the queue, and the exchange has the queue's name), which reaches only its own
queue; and a *passive* ``queue.declare`` of any name, which RabbitMQ allows without a permission
and which tells whether a queue exists and how many messages wait in it, never their content.

This module imports neither Django nor torch: ``run_site_worker --check`` calls
:func:`check_site_queue_access` (``training.site.checks``) on the hospital's machine.
"""

from __future__ import annotations

import re
import shlex
import socket
import urllib.parse
from dataclasses import dataclass

from training.queues import SITE_QUEUE_PREFIX, site_queue

__all__ = [
    "AMQP_SCHEMES",
    "REDIS_SCHEMES",
    "BrokerAccessError",
    "SitePermissions",
    "broker_vhost",
    "check_site_queue_access",
    "rabbitmq_account_argvs",
    "rabbitmq_account_commands",
    "site_broker_url",
    "site_permissions",
    "site_username",
]

#: The URL schemes of RabbitMQ (AMQP 0-9-1) brokers, as kombu names them.
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp", "librabbitmq"})
REDIS_SCHEMES = frozenset({"redis", "rediss", "sentinel"})
#: An institution's slug (Django's ``validate_slug``): it names the queue and the user, and goes
#: into a regular expression, where these characters stand for themselves.
_SLUG = re.compile(r"^[-a-zA-Z0-9_]+$")
#: RabbitMQ user names: anything printable but whitespace is accepted; these are the safe ones.
_USERNAME = re.compile(r"^[-a-zA-Z0-9_.@]+$")


class BrokerAccessError(RuntimeError):
    """The site's broker account cannot consume its queue; the message says what is wrong."""


def _checked_slug(slug: str) -> str:
    if not isinstance(slug, str) or not _SLUG.match(slug):
        raise ValueError(f"{slug!r} is not an institution slug (letters, digits, '-' and '_' only)")
    return slug


def site_username(slug: str) -> str:
    """The broker user of the site ``slug``: ``site-<slug>``."""
    return f"site-{_checked_slug(slug)}"


@dataclass(frozen=True)
class SitePermissions:
    """RabbitMQ's three permission regular expressions for one user on one virtual host."""

    configure: str
    write: str
    read: str


def site_permissions(slug: str) -> SitePermissions:
    """What the site ``slug``'s user may touch: the queue ``site.<slug>`` and the exchange of
    the same name, nothing else (see the module docstring for why each right is needed)."""
    only_its_queue = _exactly(site_queue(_checked_slug(slug)))
    return SitePermissions(configure=only_its_queue, write=only_its_queue, read=only_its_queue)


def _exactly(queue_name: str) -> str:
    """A RabbitMQ (PCRE) regular expression that matches ``queue_name`` only. A slug's own
    characters stand for themselves, so only the prefix's dot is escaped."""
    slug = queue_name.removeprefix(SITE_QUEUE_PREFIX)
    return "^" + re.escape(SITE_QUEUE_PREFIX) + _checked_slug(slug) + "$"


def _account_inputs(slug: str, password: str, vhost: str, username: str | None) -> tuple[str, ...]:
    user = site_username(slug) if username is None else username
    if not _USERNAME.match(user or ""):
        raise ValueError(
            f"{user!r} is not a usable broker user name (letters, digits, '-', '_', '.', '@')"
        )
    if not password or any(c.isspace() for c in password):
        raise ValueError("the broker password must be non-empty, without spaces or newlines")
    if not vhost:
        raise ValueError("the virtual host must be named ('/' is RabbitMQ's default one)")
    return user, password, vhost


def rabbitmq_account_argvs(
    slug: str, *, password: str, vhost: str = "/", username: str | None = None
) -> list[list[str]]:
    """The ``rabbitmqctl`` invocations (argument lists) that create the site's user and give it
    its permissions on ``vhost``. ``--`` ends the options before the password, so a password
    that starts with ``-`` is not read as one."""
    user, password, vhost = _account_inputs(slug, password, vhost, username)
    perms = site_permissions(slug)
    return [
        ["rabbitmqctl", "add_user", user, "--", password],
        ["rabbitmqctl", "set_permissions", "-p", vhost, user]
        + [perms.configure, perms.write, perms.read],
    ]


def rabbitmq_account_commands(
    slug: str, *, password: str, vhost: str = "/", username: str | None = None
) -> list[str]:
    """The same, as shell lines an operator can run on the broker's machine (quoted for sh)."""
    argvs = rabbitmq_account_argvs(slug, password=password, vhost=vhost, username=username)
    return [shlex.join(argv) for argv in argvs]


def site_broker_url(broker_url: str, *, username: str, password: str, vhost: str) -> str:
    """``broker_url`` (the consortium's AMQP broker: its scheme, host and port are kept) with the
    site's user, password and virtual host: the site's ``CELERY_BROKER_URL``."""
    parts = urllib.parse.urlsplit(broker_url)
    if parts.scheme not in AMQP_SCHEMES:
        raise ValueError(f"{_redacted(broker_url)} is not a RabbitMQ (amqp://) URL")
    host = parts.hostname or "localhost"
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = (
        f"{urllib.parse.quote(username, safe='')}:{urllib.parse.quote(password, safe='')}@{host}"
    )
    if parts.port:
        netloc += f":{parts.port}"
    path = "/" + urllib.parse.quote(vhost, safe="")
    return urllib.parse.urlunsplit((parts.scheme, netloc, path, parts.query, ""))


def broker_vhost(broker_url: str) -> str:
    """The virtual host an AMQP URL names (``/`` when it names none), as kombu reads it."""
    path = urllib.parse.urlsplit(broker_url).path
    return urllib.parse.unquote(path[1:]) if len(path) > 1 else "/"


def _redacted(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urllib.parse.urlsplit(url or "")
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# --- The check ----------------------------------------------------------------------------------


def check_site_queue_access(
    broker_url: str,
    slug: str,
    timeout: float = 10.0,
    *,
    transport_options: dict | None = None,
) -> None:
    """Raise :class:`BrokerAccessError` unless the account in ``broker_url`` can consume
    ``site.<slug>``: connect, declare the queue as the worker will (the exchange, the queue, the
    binding; idempotent, and what the worker does at start anyway), start consuming and cancel
    at once. Nothing is taken: a message delivered in between is not acknowledged, so RabbitMQ
    puts it back when the channel closes. On Redis, where accounts have no per-queue rights,
    it checks that the broker answers; on the embedded broker (files on this machine) there is
    nothing to check."""
    from kombu import Connection, Exchange, Queue  # kombu: only when a real broker is checked

    queue_name = site_queue(_checked_slug(slug))
    scheme = urllib.parse.urlsplit(broker_url or "").scheme.lower()
    if scheme in {"", "filesystem", "memory"}:
        return
    where = _redacted(broker_url)
    conn = Connection(broker_url, connect_timeout=timeout, transport_options=transport_options)
    try:
        try:
            conn.connect()
            channel = conn.channel()
        except Exception as exc:
            raise BrokerAccessError(_connect_failure(exc, where, conn)) from exc
        queue = Queue(queue_name, Exchange(queue_name, type="direct"), routing_key=queue_name)
        try:
            queue(channel).declare()
            if scheme in AMQP_SCHEMES:
                channel.basic_qos(0, 1, False)
                tag = channel.basic_consume(queue_name, callback=lambda message: None)
                channel.basic_cancel(tag)
            else:
                channel.client.ping()  # kombu's Redis channel connects lazily
        except Exception as exc:
            raise BrokerAccessError(_queue_failure(exc, where, conn, queue_name)) from exc
    finally:
        conn.release()


def _amqp_code(exc: BaseException) -> int | None:
    code = getattr(exc, "reply_code", None) or getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _connect_failure(exc: BaseException, where: str, conn) -> str:
    user = getattr(conn, "userid", None) or "(none)"
    vhost = getattr(conn, "virtual_host", None) or "/"
    code = _amqp_code(exc)
    text = str(exc).strip() or type(exc).__name__
    if code == 403:
        return (
            f"the broker at {where} refused the login of user {user!r}: wrong user name or "
            f"password in CELERY_BROKER_URL (the broker said: {text})"
        )
    if code == 530:
        return (
            f"the broker at {where} does not let user {user!r} into the virtual host {vhost!r}: "
            "the vhost does not exist or the user has no permissions there (the operator runs "
            f"`manage.py site_broker_account` for this site; the broker said: {text})"
        )
    if isinstance(exc, socket.gaierror):
        return f"cannot connect to the broker at {where}: its host name does not resolve ({text})"
    if isinstance(exc, (OSError, TimeoutError)) or "connect" in type(exc).__name__.lower():
        return f"cannot connect to the broker at {where}: {text}"
    return f"cannot use the broker at {where}: {type(exc).__name__}: {text}"


def _queue_failure(exc: BaseException, where: str, conn, queue_name: str) -> str:
    user = getattr(conn, "userid", None) or "(none)"
    code = _amqp_code(exc)
    text = str(exc).strip() or type(exc).__name__
    if code == 403:
        return (
            f"user {user!r} has no right to consume {queue_name} on the broker at {where}: its "
            "permissions must allow configure, write and read on "
            f"{_exactly(queue_name)} (the operator runs `manage.py site_broker_account`; "
            f"the broker said: {text})"
        )
    if code == 406:
        return (
            f"the queue {queue_name} on the broker at {where} exists with other settings than a "
            f"site worker declares (the broker said: {text})"
        )
    return f"cannot consume {queue_name} on the broker at {where}: {type(exc).__name__}: {text}"
