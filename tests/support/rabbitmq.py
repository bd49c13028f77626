"""For tests against this machine's RabbitMQ: whether it answers, a throwaway virtual host per
test (its users removed with it), and a real site worker started with ``run_site_worker``'s
Celery arguments.

The administrator's URL is ``RABBITMQ_TEST_URL`` (default ``amqp://guest:guest@127.0.0.1:5672//``)
and ``rabbitmqctl`` must be usable (as root, or the rabbitmq user). When either is missing the
tests marked ``rabbitmq`` are skipped, saying which, unless ``RABBITMQ_REQUIRED`` is set
(``.ci/run`` sets it): then they fail, so that CI cannot pass without them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ADMIN_URL = os.environ.get("RABBITMQ_TEST_URL", "amqp://guest:guest@127.0.0.1:5672//")
#: The task the probe worker (``tests.support.site_worker_probe``) runs: it writes a file.
PROBE_TASK = "tests.site_worker_probe"


def rabbitmqctl(*args: str, check: bool = True, stdin: str | None = None) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"rabbitmqctl {' '.join(args)}: {done.stderr or done.stdout}")
    return done.stdout


def unavailable() -> str | None:
    """Why the RabbitMQ tests cannot run here (``None``: they can)."""
    parts = urllib.parse.urlsplit(ADMIN_URL)
    try:
        socket.create_connection((parts.hostname, parts.port or 5672), timeout=2).close()
    except OSError as exc:
        return f"no RabbitMQ answers at {parts.hostname}:{parts.port or 5672} ({exc})"
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed here"
    done = subprocess.run(
        ["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return f"rabbitmqctl cannot reach the node: {(done.stderr or done.stdout).strip()[:200]}"
    return None


def require_rabbitmq() -> None:
    """Skip (or, with ``RABBITMQ_REQUIRED``, fail) when RabbitMQ cannot be used here."""
    reason = unavailable()
    if reason is None:
        return
    if os.environ.get("RABBITMQ_REQUIRED"):
        pytest.fail(f"RABBITMQ_REQUIRED is set but {reason}")
    pytest.skip(reason)


class Vhost:
    """A fresh virtual host: the administrator (``ADMIN_URL``'s user) may do everything in it;
    users made for the test are listed in ``users`` and deleted with it."""

    def __init__(self) -> None:
        self.name = f"fl-test-{uuid.uuid4().hex[:10]}"
        self.users: list[str] = []
        admin = urllib.parse.urlsplit(ADMIN_URL).username or "guest"
        rabbitmqctl("add_vhost", self.name)
        rabbitmqctl("set_permissions", "-p", self.name, admin, ".*", ".*", ".*")

    def url(self, username: str | None = None, password: str | None = None) -> str:
        """``ADMIN_URL`` on this virtual host (as ``username`` when given)."""
        parts = urllib.parse.urlsplit(ADMIN_URL)
        netloc = parts.netloc
        if username is not None:
            quote = urllib.parse.quote
            netloc = (
                f"{quote(username, safe='')}:{quote(password or '', safe='')}@"
                + (parts.netloc.rsplit("@", 1)[-1])
            )
        return urllib.parse.urlunsplit(
            (parts.scheme, netloc, "/" + urllib.parse.quote(self.name, safe=""), "", "")
        )

    def names(self, kind: str) -> set[str]:
        """The names of the ``exchanges`` or ``queues`` in it, RabbitMQ's own left out."""
        out = rabbitmqctl(f"list_{kind}", "-p", self.name, "name")
        names = {line.strip() for line in out.splitlines()} - {"", "name"}
        return {n for n in names if not n.startswith("amq.")}

    def remove(self) -> None:
        for user in self.users:
            rabbitmqctl("delete_user", user, check=False)
        rabbitmqctl("delete_vhost", self.name, check=False)


class ProbeWorker:
    """``python -m tests.support.site_worker_probe SLUG``: the project's Celery app with
    ``run_site_worker``'s ``worker_argv`` for ``SLUG``, on ``broker_url``, as a child process
    without database settings."""

    def __init__(self, slug: str, broker_url: str, log: Path) -> None:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in {"DATABASE_URL", "CELERY_RESULT_BACKEND", "CELERY_DATA_DIR"}
        }
        env.update(
            CELERY_BROKER_URL=broker_url,
            DJANGO_SETTINGS_MODULE="consortium.settings",
            PYTHONPATH=str(ROOT),
        )
        self.log = log
        self._out = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.support.site_worker_probe", slug],
            cwd=ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, path: Path, *, timeout: float = 90.0) -> None:
        """Wait until ``path`` exists (the probe task ran); fail if the worker dies first."""
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"the site worker stopped:\n{self.text()[-4000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"the task did not run in {timeout:g} s:\n{self.text()[-4000:]}"
                )
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # Celery's warm shutdown
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self._out.close()


def send_probe(broker_url: str, queue: str, path: Path) -> None:
    """Send the probe task to ``queue`` as the coordinator sends the site task (``send_task``
    with the queue), through an app of its own on ``broker_url``."""
    from celery import Celery

    sender = Celery("probe-sender", broker=broker_url, set_as_current=False)
    try:
        # An explicit connection: Celery prefers a CELERY_BROKER_URL in the environment (the
        # suite's own broker, e.g. Redis) over the broker an app is given.
        with sender.connection_for_write(broker_url) as connection:
            sender.send_task(PROBE_TASK, args=[str(path)], queue=queue, connection=connection)
    finally:
        sender.close()
