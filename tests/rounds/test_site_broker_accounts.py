"""Each site on its own broker account, and task time limits under the broker's consumer timeout.

The tests marked ``rabbitmq`` run against this machine's RabbitMQ (``tests.support.rabbitmq``),
each in a virtual host of its own: site A's account, made by ``manage.py site_broker_account``,
consumes ``site.<a>`` but cannot read ``site.<b>`` nor publish to ``central``, and a real Celery
worker started with ``run_site_worker``'s arguments runs a task with only that account. The
others need no broker.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from io import StringIO

import amqp
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from kombu import Connection, Exchange, Queue

from tests.support.rabbitmq import ROOT, ProbeWorker, Vhost, require_rabbitmq, send_probe
from training.management.commands.run_site_worker import worker_argv
from training.queues import (
    CENTRAL_QUEUE,
    DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS,
    TimeLimitError,
    site_queue,
    task_time_limits,
)
from training.site.broker import (
    BrokerAccessError,
    check_site_queue_access,
    rabbitmq_account_commands,
    site_broker_url,
    site_permissions,
)

# --- The account's lines and rights (no broker) ---------------------------------------------------


def test_the_rabbitmqctl_lines_create_a_user_allowed_only_its_queue():
    lines = rabbitmq_account_commands("hospital-a", password="s3cr-t", vhost="consortium")
    assert lines == [
        "rabbitmqctl add_user site-hospital-a -- s3cr-t",
        "rabbitmqctl set_permissions -p consortium site-hospital-a "
        "'^site\\.hospital-a$' '^site\\.hospital-a$' '^site\\.hospital-a$'",
    ]
    # What a shell hands rabbitmqctl: a password with shell characters stays one argument.
    odd = rabbitmq_account_commands("b", password="-a$b'c", vhost="/", username="ops-b")
    assert shlex.split(odd[0]) == ["rabbitmqctl", "add_user", "ops-b", "--", "-a$b'c"]
    assert shlex.split(odd[1])[2:5] == ["-p", "/", "ops-b"]


def test_the_permissions_match_the_sites_queue_and_exchange_only():
    perms = site_permissions("hospital-a")
    assert perms.configure == perms.write == perms.read == r"^site\.hospital-a$"
    allowed = re.compile(perms.read)  # RabbitMQ's regular expressions are PCRE: same here
    assert allowed.search("site.hospital-a")
    for other in (
        "site.hospital-b",
        "site.hospital-ab",
        "site.hospital",
        "siteXhospital-a",
        "xsite.hospital-a",
        CENTRAL_QUEUE,
        "amq.default",
        "celeryev",
        "celery.pidbox",
        "site-hospital-a@host.celery.pidbox",
    ):
        assert not allowed.search(other), other


@pytest.mark.parametrize("slug", ["", "a.b", "a*", "a$", "a b", "site.*"])
def test_a_slug_that_is_not_one_is_refused(slug):
    with pytest.raises(ValueError, match="not an institution slug"):
        site_permissions(slug)


def test_the_sites_broker_url_keeps_the_brokers_host_and_quotes_the_rest():
    url = site_broker_url(
        "amqp://guest:guest@rabbit.internal:5672//", username="site-a", password="p@ss/w", vhost="/"
    )
    assert url == "amqp://site-a:p%40ss%2Fw@rabbit.internal:5672/%2F"
    conn = Connection(url)
    assert (conn.userid, conn.password, conn.virtual_host) == ("site-a", "p@ss/w", "/")
    with pytest.raises(ValueError, match="not a RabbitMQ"):
        site_broker_url("redis://h:6379/0", username="u", password="p", vhost="/")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("redis://127.0.0.1:6379/0", "one trust domain"),
        ("filesystem://", "embedded broker"),
    ],
)
def test_brokers_without_accounts_are_refused_saying_why(url, said):
    with pytest.raises(CommandError, match=said):
        call_command("site_broker_account", "--slug", "hospital-a", "--broker-url", url)


def test_the_command_prints_the_lines_and_the_sites_url(cast, tmp_path):
    secret = tmp_path / "password"
    secret.write_text("pa55word\n")
    out, err = StringIO(), StringIO()
    call_command(
        "site_broker_account",
        "--slug",
        cast.hospital_a.slug,
        "--password-file",
        str(secret),
        "--broker-url",
        "amqp://ops:x@rabbit.internal:5672/consortium",
        stdout=out,
        stderr=err,
    )
    slug = cast.hospital_a.slug
    assert out.getvalue().splitlines() == [
        *rabbitmq_account_commands(slug, password="pa55word", vhost="consortium"),
        f"# CELERY_BROKER_URL=amqp://site-{slug}:pa55word@rabbit.internal:5672/consortium",
    ]
    assert f"consume site.{slug} and nothing else" in err.getvalue()
    with pytest.raises(CommandError, match="no institution with the slug 'nowhere'"):
        call_command("site_broker_account", "--slug", "nowhere", "--broker-url", "amqp://rabbit//")


@pytest.mark.parametrize("broker_url", ["amqp://site-a:pw@rabbit:5672/consortium", "filesystem://"])
def test_the_site_worker_runs_without_remote_control_events_gossip_mingle_or_heartbeats(
    broker_url,
):
    argv = worker_argv("hospital-a", pool="prefork", broker_url=broker_url)
    assert argv[:3] == ["worker", "-Q", "site.hospital-a"]
    for flag in ("--without-gossip", "--without-mingle", "--without-heartbeat"):
        assert flag in argv
    # Celery has no option for these two: configuration for this worker only.
    assert "worker_enable_remote_control=False" in argv
    assert "worker_send_task_events=False" in argv
    assert not {"-E", "--task-events", "--events", "-B", "--beat"} & set(argv)


def test_on_redis_the_site_worker_keeps_remote_control():
    # Without it a site worker holding a task when Redis restarts never consumes again
    # (tests/faults, "broker down during uploads").
    argv = worker_argv("hospital-a", pool="prefork", broker_url="redis://127.0.0.1:6379/0")
    assert "worker_enable_remote_control=False" not in argv
    assert "worker_send_task_events=False" in argv
    assert "--without-heartbeat" in argv


# --- Time limits under the consumer timeout (no broker) -------------------------------------------


def test_the_default_limits_fit_under_rabbitmqs_default_consumer_timeout():
    limits = task_time_limits(consumer_timeout=DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS)
    assert DEFAULT_BROKER_CONSUMER_TIMEOUT_SECONDS == 1800  # RabbitMQ's default (measured)
    assert (limits.soft, limits.hard, limits.ceiling) == (1620, 1740, 1740)
    longer = task_time_limits(consumer_timeout=7200)
    assert (longer.soft, longer.hard) == (7020, 7140)
    assert task_time_limits(consumer_timeout=1800, soft=600).hard == 720
    assert task_time_limits(consumer_timeout=1800, soft=1700).hard == 1740


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"hard": 1920}, "FL_SITE_TASK_HARD_LIMIT=1920 s does not fit under"),
        ({"soft": 1800}, "FL_SITE_TASK_SOFT_LIMIT=1800 s must be positive and below"),
        ({"soft": 900, "hard": 900}, "must be positive and below the hard limit"),
        ({"hard": 100}, "FL_SITE_TASK_SOFT_LIMIT=-20 s must be positive"),
    ],
)
def test_limits_that_do_not_fit_are_refused_saying_what_to_change(kwargs, said):
    with pytest.raises(TimeLimitError, match=re.escape(said)):
        task_time_limits(consumer_timeout=1800, **kwargs)
    with pytest.raises(TimeLimitError, match="leaves no time"):
        task_time_limits(consumer_timeout=120)


def test_every_task_ends_before_the_broker_would_close_its_channel(settings):
    import training.rounds.tasks as tasks
    from consortium.celery import app

    ceiling = settings.BROKER_CONSUMER_TIMEOUT_SECONDS - 60
    assert ceiling >= settings.FL_SITE_TASK_HARD_LIMIT
    assert app.conf.task_time_limit == ceiling  # every task without a limit of its own
    site_tasks = [t for t in vars(tasks).values() if getattr(t, "name", "") in app.tasks]
    assert site_tasks
    for task in site_tasks:
        assert (task.time_limit or app.conf.task_time_limit) <= ceiling, task.name
        if task.soft_time_limit:
            assert task.soft_time_limit < (task.time_limit or ceiling), task.name


def _settings_load(**env: str) -> subprocess.CompletedProcess:
    code = "import django; django.setup(); from django.conf import settings as s; " + (
        "print(s.FL_SITE_TASK_SOFT_LIMIT, s.FL_SITE_TASK_HARD_LIMIT)"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FL_SITE", "BROKER"))}
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**base, "DJANGO_SETTINGS_MODULE": "consortium.settings", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_hard_limit_above_the_consumer_timeout_is_refused_at_start_up():
    refused = _settings_load(FL_SITE_TASK_HARD_LIMIT="1920")
    assert refused.returncode != 0
    assert "FL_SITE_TASK_HARD_LIMIT=1920 s does not fit under" in refused.stderr
    assert "BROKER_CONSUMER_TIMEOUT_SECONDS=1800" in refused.stderr
    raised = _settings_load(FL_SITE_TASK_HARD_LIMIT="1920", BROKER_CONSUMER_TIMEOUT_SECONDS="3600")
    assert raised.returncode == 0, raised.stderr
    assert raised.stdout.split() == ["1800", "1920"]


# --- Against RabbitMQ ----------------------------------------------------------------------------


@pytest.fixture
def vhost():
    require_rabbitmq()
    made = Vhost()
    yield made
    made.remove()


def _account(vhost: Vhost, slug: str) -> str:
    """``site_broker_account --apply`` for ``slug`` on ``vhost``: the site's URL."""
    out = StringIO()
    call_command(
        "site_broker_account",
        "--slug",
        slug,
        "--vhost",
        vhost.name,
        "--apply",
        "--broker-url",
        vhost.url(),
        stdout=out,
        stderr=StringIO(),
    )
    vhost.users.append(f"site-{slug}")
    return out.getvalue().strip()


def _queue(name: str) -> Queue:
    """A queue as Celery declares it for ``send_task(queue=name)`` and ``worker -Q name``."""
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def _refused(action) -> str:
    """Run ``action`` (on a channel of its own) and return RabbitMQ's refusal."""
    with pytest.raises(amqp.exceptions.AccessRefused) as refused:
        action()
    return str(refused.value)


@pytest.mark.rabbitmq
def test_a_sites_account_consumes_its_queue_and_nothing_else(cast, vhost):
    a, b = cast.hospital_a.slug, cast.hospital_b.slug
    url_a, url_b = _account(vhost, a), _account(vhost, b)
    assert url_a.startswith(f"amqp://site-{a}:") and url_a.endswith(f"/{vhost.name}")
    queues = {name: _queue(name) for name in (site_queue(a), site_queue(b), CENTRAL_QUEUE)}
    # As the coordinator: one message on each queue.
    with Connection(vhost.url()) as admin, admin.Producer() as producer:
        for name, queue in queues.items():
            producer.publish(
                {"for": name}, exchange=queue.exchange, routing_key=name, declare=[queue]
            )

    with Connection(url_a) as conn:
        message = _queue(site_queue(a))(conn.channel()).get(no_ack=False)
        assert message is not None and message.payload == {"for": site_queue(a)}
        message.ack()
        said = _refused(lambda: conn.channel().basic_get(site_queue(b)))
        assert f"access to queue '{site_queue(b)}'" in said and "ACCESS_REFUSED" in said
        said = _refused(lambda: conn.channel().basic_consume(site_queue(b), callback=print))
        assert "ACCESS_REFUSED" in said
        _refused(lambda: conn.channel().queue_purge(site_queue(b)))
        _refused(lambda: conn.channel().queue_delete(site_queue(b)))

        def publish(exchange):
            # With a publisher confirm, so that the refusal comes back before this returns.
            conn.channel().basic_publish_confirm(
                amqp.Message(b"{}"), exchange=exchange, routing_key="central", timeout=10
            )

        assert "exchange 'central'" in _refused(lambda: publish(CENTRAL_QUEUE))
        assert "exchange 'amq.default'" in _refused(lambda: publish(""))

    with Connection(vhost.url()) as admin:  # nothing of site B's or central's was touched
        channel = admin.channel()
        assert channel.queue_declare(site_queue(b), passive=True).message_count == 1
        assert channel.queue_declare(CENTRAL_QUEUE, passive=True).message_count == 1
    check_site_queue_access(url_a, a)
    check_site_queue_access(url_b, b)
    with pytest.raises(BrokerAccessError, match=f"no right to consume {re.escape(site_queue(b))}"):
        check_site_queue_access(url_a, b)
    wrong = url_a.replace(f"site-{a}:", f"site-{a}:x", 1)
    with pytest.raises(BrokerAccessError, match="refused the login"):
        check_site_queue_access(wrong, a)
    with pytest.raises(CommandError, match=f"site-{a} already exists"):
        _account(vhost, a)


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_a_site_worker_runs_a_task_with_only_its_own_account(cast, vhost, tmp_path):
    slug = cast.hospital_a.slug
    url = _account(vhost, slug)
    worker = ProbeWorker(slug, url, tmp_path / "worker.log")
    try:
        ran = tmp_path / "ran"
        send_probe(vhost.url(), site_queue(slug), ran)  # sent as the coordinator sends
        worker.wait_for(ran)
        time.sleep(3)  # a heartbeat or an event would be refused within 2 s
        assert worker.process.poll() is None, worker.text()
    finally:
        worker.stop()
    log = worker.text()
    assert f"Connected to amqp://site-{slug}:**@" in log
    assert "ACCESS_REFUSED" not in log and "Traceback" not in log, log[-4000:]


@pytest.mark.rabbitmq
@pytest.mark.worker
def test_the_site_worker_declares_nothing_but_its_queue(vhost, tmp_path):
    """With every right (the administrator's account), so that anything else it wanted would be
    created and seen here: no pidbox, no celeryev, no reply queue."""
    worker = ProbeWorker("probe", vhost.url(), tmp_path / "worker.log")
    try:
        ran = tmp_path / "ran"
        send_probe(vhost.url(), site_queue("probe"), ran)
        worker.wait_for(ran)
        time.sleep(3)  # the first heartbeat goes out 2 s after start
        exchanges, queues = vhost.names("exchanges"), vhost.names("queues")
    finally:
        worker.stop()
    assert exchanges == {"site.probe"}, exchanges
    assert queues == {"site.probe"}, queues
