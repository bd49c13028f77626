"""The processes the demo starts, and the supervisor that starts and stops them.

The central web server (Daphne), one central Celery worker with beat (queue ``central``: the
coordinator), one scoring worker (queue ``scoring``: contribution scores, off the rounds'
critical path) and one site worker per hospital (``manage.py run_site_worker``, queue
``site.<slug>``). A site worker gets a ``DATABASE_URL`` that points into a folder that does not
exist: it must not need the database, and any query would fail its round.

Every process runs in its own process group (so a worker's pool children and beat stop with
it) and logs to ``<log_dir>/<name>.log``.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from training.demo.sites import SiteFiles
from training.queues import CENTRAL_QUEUE, SCORING_QUEUE


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    reported_dead: bool = False
    read_upto: int = 0

    def new_errors(self) -> list[str]:
        """The log's ERROR lines written since the last call (a failed site task, say)."""
        try:
            with self.log.open("rb") as handle:
                handle.seek(self.read_upto)
                data = handle.read()
        except OSError:
            return []
        end = data.rfind(b"\n") + 1  # whole lines only
        self.read_upto += end
        lines = data[:end].decode("utf-8", "replace").splitlines()
        return [line for line in lines if "ERROR/" in line or "CRITICAL/" in line]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Supervisor:
    """Starts the demo's processes, each in its own process group, and stops them all."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict) -> Child:
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and fixed commands
                argv,
                cwd=settings.BASE_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: pool children and beat too
            )
        child = Child(name, proc, log)
        self.children.append(child)
        return child

    def dead(self) -> list[Child]:
        return [c for c in self.children if not c.alive()]

    def stop_all(self, grace: float = 15.0) -> None:
        # SIGTERM to each leader only: a Celery worker then shuts down warmly and stops its own
        # pool and beat (terminating the pool child at the same time sometimes keeps the worker
        # waiting for it until the grace runs out).
        for child in self.children:
            if child.alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(child.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        for child in self.children:
            # Whatever is left in the group (a leader that would not stop, an orphaned pool
            # child or beat) goes now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(timeout=5)
        self.children.clear()


#: Where the kernel takes the ports of outgoing connections when its range cannot be read
#: (Linux's default ``net.ipv4.ip_local_port_range``).
_DEFAULT_EPHEMERAL_RANGE = (32768, 60999)
#: The lowest port handed out: clear of the well-known and registered services below it.
_LOWEST_LISTENING_PORT = 10000


def _ephemeral_port_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL_RANGE


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, for a server started a moment later.

    Chosen below the kernel's ephemeral range, never inside it: between this call and the
    server's bind, the other processes open connections (to PostgreSQL, the broker, each
    other), and each takes an ephemeral port for its own end; a port from that range (which
    is what binding to port 0 returns) can be taken by one of them in the gap, and the server
    then fails with "Address already in use" (seen in CI, after the migrations that run
    before the web server starts). A port outside the range is only ever taken by a process
    that asks for it by number.
    """
    low, _high = _ephemeral_port_range()
    if low - _LOWEST_LISTENING_PORT >= 1000:
        rng = random.SystemRandom()
        for _ in range(200):
            port = rng.randrange(_LOWEST_LISTENING_PORT, low)
            if port_free(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own URL
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def demo_site_url(port: int, environ: dict | None = None) -> str:
    """The URL every link of the demo names (invitations, notifications, the dashboard it
    prints): ``SITE_URL`` when the environment sets it, else the demo server's own address on
    ``port``, never the default port's."""
    explicit = (os.environ if environ is None else environ).get("SITE_URL", "").strip()
    return explicit.rstrip("/") if explicit else f"http://127.0.0.1:{port}"


def demo_env(site_url: str) -> dict:
    """The environment every process of the demo starts with; ``site_url`` is their
    ``SITE_URL`` (:func:`demo_site_url`)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SITE_URL": site_url}
    env.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
    # A site task that failed (or a worker that died) is sent again after this long,
    # not after the production default of five minutes: a demo round takes seconds.
    env.setdefault("FL_REDISPATCH_AFTER_SECONDS", "30")
    return env


def server_argv(port: int) -> list[str]:
    """The central web server: HTTP and the live pages' websockets, on 127.0.0.1."""
    return [
        sys.executable,
        "-m",
        "daphne",
        "-b",
        "127.0.0.1",
        "-p",
        str(port),
        "consortium.asgi:application",
    ]


def celery_worker_argv(
    queue: str, *, hostname: str, beat_schedule: Path | None = None
) -> list[str]:
    """One central Celery worker on ``queue``, one task at a time; with ``beat_schedule``, it
    also runs Celery beat (the demo's coordinator), keeping beat's schedule in that file."""
    beat = ["-B", "--schedule", str(beat_schedule)] if beat_schedule is not None else []
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "consortium",
        "worker",
        *beat,
        "-Q",
        queue,
        "--concurrency",
        "1",
        "--loglevel",
        "INFO",
        "--hostname",
        hostname,
        "--without-gossip",
        "--without-mingle",
    ]


def central_worker_argv(var: Path) -> list[str]:
    """The coordinator: one Celery worker with beat, on queue ``central``."""
    return celery_worker_argv(
        CENTRAL_QUEUE, hostname="demo-central@%h", beat_schedule=var / "celerybeat-schedule"
    )


def scoring_worker_argv(hostname: str = "demo-scoring@%h") -> list[str]:
    """Contribution scoring: one Celery worker on queue ``scoring``, one round at a time (a
    round's coalitions already use the cores; two at once would only slow both). Apart from
    the coordinator, so that no round's close waits behind a score."""
    return celery_worker_argv(SCORING_QUEUE, hostname=hostname)


def site_worker_argv() -> list[str]:
    """A hospital's site worker (its queue comes from ``SITE_SLUG``)."""
    return [
        sys.executable,
        str(Path(settings.BASE_DIR) / "manage.py"),
        "run_site_worker",
        "--pool",
        "prefork",
    ]


def site_worker_env(env: dict, site: SiteFiles, *, central_url: str, var: Path) -> dict:
    """A site worker's environment: its credentials and data, and no database."""
    # Proof that a site worker needs no database: any query would fail on this path.
    no_db = f"sqlite:///{var / 'no-such-folder' / 'site-workers-have-no-database.sqlite3'}"
    return {
        **env,
        "DATABASE_URL": no_db,
        "SITE_SLUG": site.slug,
        "CENTRAL_URL": central_url,
        "SITE_TOKEN": site.token,
        "SITE_SIGNING_KEY": str(site.key_path),
        "DATA_ROOT": str(site.data_root),
    }
