"""A cluster of real processes for one consortium, for the fault suite (tests/faults/) and the
recovery benchmark (benchmarks/recovery.py): the central web server (Daphne), the coordinator
(``celery -A consortium worker -Q central``), Celery beat (``celery -A consortium beat``: the
``rounds_tick`` every :data:`TICK_SECONDS`, the production interval) and one
``manage.py run_site_worker`` per hospital, with the commands the demo and the systemd units use
(``training.demo.processes``), on the PostgreSQL database this process uses and a throwaway
Redis of the cluster's own (:class:`tests.support.redis_server.RedisServer`: broker on db 0,
channel layer on db 1) that it can kill and start again empty.

The helpers inject the faults: :meth:`FaultCluster.kill` (SIGKILL to a process group) and
:meth:`FaultCluster.start`, :meth:`FaultCluster.terminate_coordinator_connections`
(``pg_terminate_backend`` on the backends of the coordinator: its processes connect with
libpq's ``PGAPPNAME`` set to :data:`COORDINATOR_APP`), and :func:`hold_aggregation`, which
parks the coordinator *inside* a round's aggregation, after its claim committed and before the
close, without any hook in the product: it holds ``LOCK TABLE training_globalmodel IN SHARE
MODE`` on a connection of its own, so the close's ``INSERT`` of the new global model waits.

Nothing here decides what a scenario asserts; :mod:`tests.faults.checks` does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg2
from django.conf import settings

from tests.support.child_processes import child_database_url
from tests.support.redis_server import RedisServer
from training import queues
from training.demo.processes import server_argv, site_worker_argv

ROOT = Path(__file__).resolve().parents[2]

#: The tick interval of production (``training.queues.ROUNDS_TICK``): the suite's unit of time.
TICK_SECONDS = float(queues.ROUNDS_TICK.every_seconds or 10.0)
#: The aggregation claim's lease the cluster runs with (``FL_CLAIM_LEASE_SECONDS``; production's
#: default is 30 s): a killed claimer costs at most this plus a tick.
LEASE_SECONDS = 10
#: A lost site task is sent again after this long (``FL_REDISPATCH_AFTER_SECONDS``).
REDISPATCH_SECONDS = 15
#: How long each site worker waits between its signature and its upload
#: (``FL_TEST_SLEEP_BEFORE_UPLOAD``): the window in which a scenario restarts the web server or
#: replays an upload while the round is open.
UPLOAD_PAUSE_SECONDS = 1.5
#: libpq's application name of the coordinator's connections (``PGAPPNAME``).
COORDINATOR_APP = "fl-fault-coordinator"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_answers(url: str) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own URL
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_until(
    what: str,
    probe: Callable[[], object],
    *,
    timeout: float,
    every: float = 0.2,
    cluster: FaultCluster | None = None,
):
    """Call ``probe`` until it returns a true value, which is returned; AssertionError saying
    ``what`` (and the cluster's log tails) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            tails = cluster.tails() if cluster is not None else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")
        time.sleep(every)


# --- The consortium ---------------------------------------------------------------------------


def build_cast():
    """What ``tests/conftest.py``'s ``cast`` makes (a consortium, hospitals A and B and their
    people), for a cluster that outlives one test: the same services, called once per module."""
    from tests.support.cast import make_cast

    return make_cast(consortium_name="Fault Consortium")


# --- The processes ----------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict
    log: Path
    process: subprocess.Popen | None = None
    starts: int = 0

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@dataclass
class FaultCluster:
    """The processes of one consortium (``c3``: tests.support.fl_harness.Consortium3) on a
    throwaway Redis. Built by :func:`start_cluster`; :meth:`stop` ends everything."""

    root: Path
    redis: RedisServer
    c3: object
    database_url: str
    web_port: int
    procs: dict[str, Proc] = field(default_factory=dict)
    #: The logs' sizes when the running scenario started (:meth:`log_sizes`).
    logs_at_start: dict[str, int] = field(default_factory=dict)

    # --- environment ---

    @property
    def central_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"

    def central_env(self, **extra: str) -> dict:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "consortium.settings",
            "DATABASE_URL": self.database_url,
            "CELERY_BROKER_URL": self.redis.url(0),
            "CHANNEL_LAYER_URL": self.redis.url(1),
            "ARTIFACT_ROOT": str(self.artifact_root),
            "SITE_URL": self.central_url,
            "PYTHONUNBUFFERED": "1",
            "FL_CLAIM_LEASE_SECONDS": str(LEASE_SECONDS),
            "FL_REDISPATCH_AFTER_SECONDS": str(REDISPATCH_SECONDS),
            "PYTHONPATH": str(ROOT),
            **extra,
        }
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        env.pop("CELERY_TASK_ALWAYS_EAGER", None)
        return env

    def site_env(self, site) -> dict:
        env = {
            **self.central_env(),
            **site.env(self.central_url),
            # A site worker has no database: any query would fail on this path.
            "DATABASE_URL": f"sqlite:///{self.root}/no-such-folder/site-workers-have-none.sqlite3",
            "FL_TEST_SLEEP_BEFORE_UPLOAD": str(UPLOAD_PAUSE_SECONDS),
            # Requests are retried within the round (issue 13): long enough to ride out a
            # restart of the web server.
            "CENTRAL_RETRY_SECONDS": "60",
        }
        for key in ("CHANNEL_LAYER_URL", "ARTIFACT_ROOT", "PGAPPNAME"):
            env.pop(key, None)
        return env

    # --- processes ---

    def add(self, name: str, argv: list[str], env: dict) -> Proc:
        proc = Proc(name=name, argv=argv, env=env, log=self.root / "logs" / f"{name}.log")
        self.procs[name] = proc
        return proc

    def start(self, name: str) -> Proc:
        """Start (again) the process ``name``, in a process group of its own; its log grows."""
        proc = self.procs[name]
        assert not proc.alive(), f"{name} is running"
        proc.log.parent.mkdir(parents=True, exist_ok=True)
        with proc.log.open("ab") as out:
            out.write(f"\n===== start {proc.starts + 1} at {time.time():.3f} =====\n".encode())
            out.flush()
            proc.process = subprocess.Popen(  # noqa: S603 - our own interpreter and commands
                proc.argv,
                cwd=ROOT,
                env=proc.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        proc.starts += 1
        return proc

    def kill(self, name: str) -> None:
        """SIGKILL to the whole process group (a Celery worker's pool children too)."""
        proc = self.procs[name]
        if proc.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.process.wait(timeout=10)

    def stop_process(self, name: str, grace: float = 10.0) -> None:
        """SIGTERM to the leader (a warm shutdown), then SIGKILL to what is left of the group."""
        proc = self.procs[name]
        if proc.process is None:
            return
        if proc.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.process.wait(timeout=grace)
        self.kill(name)

    def restart(self, name: str, *, down_for: float = 0.0) -> None:
        self.kill(name)
        time.sleep(down_for)
        self.start(name)

    def wait_ready(self, name: str, timeout: float = 90.0) -> None:
        """Until the process is ready: the web server answers, a Celery worker logs
        ``ready.`` (for this start), beat logs its start."""
        proc = self.procs[name]
        if name == "web":
            probe = lambda: _http_answers(self.central_url + "/health/")  # noqa: E731
        else:
            marker = "beat: Starting" if name == "beat" else " ready."

            def probe():
                assert proc.alive(), f"{name} exited:\n{proc.tail()}"
                return marker in proc.text().rsplit("===== start", 1)[-1]

        wait_until(f"{name} to be ready", probe, timeout=timeout, cluster=self)

    def log_sizes(self) -> dict[str, int]:
        """Each process's log size now: what :meth:`server_errors` reads from."""
        return {n: len(p.text().encode()) for n, p in self.procs.items()}

    def server_errors(self, since: dict[str, int] | None = None) -> list[str]:
        """The web server's access-log lines with a 5xx status (since ``since``)."""
        data = self.procs["web"].log.read_bytes() if self.procs["web"].log.exists() else b""
        data = data[(since or {}).get("web", 0) :]
        return [
            line
            for line in data.decode("utf-8", "replace").splitlines()
            if re.search(r'" 5\d\d \d+$', line)
        ]

    def dead(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.process is not None and not p.alive()]

    def tails(self, chars: int = 2500) -> str:
        parts = [f"--- {n} ---\n{p.tail(chars)}" for n, p in self.procs.items()]
        parts.append(f"--- redis ---\n{self.redis.tail(800)}")
        return "\n".join(parts)

    def stop(self) -> None:
        for name in self.procs:
            proc = self.procs[name]
            if proc.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for name, proc in self.procs.items():
            if proc.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            self.kill(name)
        self.redis.stop()

    # --- the database ---

    def connect(self, **kwargs):
        """A psycopg2 connection of the test's own to the cluster's database."""
        return psycopg2.connect(self.database_url, **kwargs)

    def coordinator_backends(self) -> list[int]:
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s "
                "AND datname = current_database()",
                [COORDINATOR_APP],
            )
            return [row[0] for row in cur.fetchall()]

    def terminate_coordinator_connections(self) -> list[int]:
        """``pg_terminate_backend`` on every backend of the coordinator's processes (worker and
        pool; beat connects to no database). Returns the backends' pids."""
        pids = self.coordinator_backends()
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            for pid in pids:
                cur.execute("SELECT pg_terminate_backend(%s)", [pid])
        return pids

    def coordinator_waits_on_lock(self) -> bool:
        """Whether a coordinator backend is waiting on a heavyweight lock (held by the test)."""
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'",
                [COORDINATOR_APP],
            )
            return cur.fetchone()[0] > 0


@contextlib.contextmanager
def hold_table(cluster: FaultCluster, table: str) -> Iterator[None]:
    """While the block runs, nothing can be inserted into ``table`` (``LOCK TABLE ... IN SHARE
    MODE`` on a connection of the test's own); reads go on. A process that inserts waits,
    inside its transaction, until the block ends."""
    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'LOCK TABLE "{table}" IN SHARE MODE')
        yield
    finally:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        conn.close()


def hold_aggregation(cluster: FaultCluster):
    """While the block runs, no ``GlobalModel`` can be inserted: a coordinator that claims a
    round for aggregation computes the new model and then waits, inside the close's
    transaction (job row locked, claim committed), until the block ends."""
    return hold_table(cluster, "training_globalmodel")


def site_worker_name(slug: str) -> str:
    return f"site-{slug}"


def start_cluster(
    root: Path, c3, redis: RedisServer, *, database_url: str | None = None
) -> FaultCluster:
    """Start the web server, the coordinator, beat and one site worker per site of ``c3`` on
    ``redis`` (started here if it is not running), and wait until all are ready."""
    if not redis.running():
        redis.start()
    cluster = FaultCluster(
        root=root,
        redis=redis,
        c3=c3,
        database_url=database_url or child_database_url(),
        web_port=_free_port(),
    )
    cluster.artifact_root.mkdir(parents=True, exist_ok=True)
    cluster.add("web", server_argv(cluster.web_port), cluster.central_env())
    cluster.add(
        "coordinator",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "consortium",
            "worker",
            "-Q",
            queues.CENTRAL_QUEUE,
            "--concurrency",
            "1",
            "--loglevel",
            "INFO",
            "--hostname",
            "fault-central@%h",
            "--without-gossip",
            "--without-mingle",
        ],
        cluster.central_env(PGAPPNAME=COORDINATOR_APP),
    )
    cluster.add(
        "beat",
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "consortium",
            "beat",
            "--loglevel",
            "INFO",
            "--schedule",
            str(root / "celerybeat-schedule"),
        ],
        cluster.central_env(PGAPPNAME="fl-fault-beat"),
    )
    for site in c3.sites:
        cluster.add(site_worker_name(site.slug), site_worker_argv(), cluster.site_env(site))
    try:
        for name in cluster.procs:
            cluster.start(name)
        for name in cluster.procs:
            cluster.wait_ready(name)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def point_this_process_at(redis: RedisServer) -> Callable[[], None]:
    """Make this process's Celery app send to ``redis`` (a test's sends, e.g. the last
    approval's ``job_start`` when it is not relayed from the outbox). Returns the undo."""
    import kombu.pools

    from consortium.celery import app

    saved = (app.conf.broker_url, app.conf.broker_transport_options, settings.CELERY_BROKER_URL)

    def reset():
        kombu.pools.reset()
        app._pool = None
        app.amqp._producer_pool = None

    app.conf.broker_url = redis.url(0)
    app.conf.broker_transport_options = {"visibility_timeout": 3600}
    reset()

    def undo():
        app.conf.broker_url, app.conf.broker_transport_options, _ = saved
        reset()

    return undo
