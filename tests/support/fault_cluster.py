"""A cluster of real processes for one consortium, for the fault suite (tests/faults/) and the
recovery benchmark (benchmarks/recovery.py): the central web server (Daphne), the coordinator
(``celery -A consortium worker -Q central``), the scoring worker (``celery -A consortium worker
-Q scoring``: contribution scores), Celery beat (``celery -A consortium beat``: the
``rounds_tick`` every :data:`TICK_SECONDS`, the production interval) and one
``manage.py run_site_worker`` per hospital, with the commands the demo and the systemd units use
(``training.demo.processes``), in either of the two configurations the README documents:

* PostgreSQL (the database this process's tests use) and a throwaway Redis of the cluster's own
  (:class:`tests.support.redis_server.RedisServer`: broker on db 0, channel layer on db 1) that
  it can kill and start again empty;
* the embedded default: a SQLite file of the cluster's own (pytest's SQLite test database lives
  in this process's memory, where no other process can reach it: tests/faults/conftest.py
  copies it to a file and points this process at the copy) and kombu's filesystem transport in
  a folder of the cluster's own (:class:`tests.support.filesystem_broker.FilesystemBroker`),
  which has no process to kill.

The helpers inject the faults: :meth:`FaultCluster.kill` (SIGKILL to a process group) and
:meth:`FaultCluster.start`, :meth:`FaultCluster.terminate_coordinator_connections`
(``pg_terminate_backend`` on the backends of the coordinator: its processes connect with
libpq's ``PGAPPNAME`` set to :data:`COORDINATOR_APP`, the scoring worker's with
:data:`SCORING_APP`; PostgreSQL only), and :func:`hold_aggregation`, which parks the
coordinator *inside* a round's aggregation, after its claim committed and before the close,
without any hook in the product (:func:`hold_table` on the scores' table parks the scoring
worker inside its recording the same way). On PostgreSQL it holds
``LOCK TABLE training_globalmodel IN SHARE MODE`` on a connection of its own, so the close's
``INSERT`` of the new global model waits; SQLite has no table locks, so there a temporary
trigger on that ``INSERT`` keeps the close's transaction busy (counting a large cross join)
until the scenario kills the coordinator or the block ends.

Nothing here decides what a scenario asserts; :mod:`tests.faults.checks` does.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.child_processes import child_database_url
from tests.support.filesystem_broker import FilesystemBroker
from tests.support.redis_server import RedisServer
from training import queues
from training.demo.processes import (
    celery_worker_argv,
    free_port,
    scoring_worker_argv,
    server_argv,
    site_worker_argv,
)

ROOT = Path(__file__).resolve().parents[2]
#: A broker of the cluster's own: a throwaway Redis, or the embedded default's folders.
Broker = RedisServer | FilesystemBroker

#: The tick interval of production (``training.queues.ROUNDS_TICK``): the suite's unit of time.
TICK_SECONDS = float(queues.ROUNDS_TICK.every_seconds or 10.0)
#: The aggregation claim's lease the cluster runs with (``FL_CLAIM_LEASE_SECONDS``; production's
#: default is 30 s): a killed claimer costs at most this plus a tick.
LEASE_SECONDS = 10
#: A lost site task (or scoring message) is sent again after this long
#: (``FL_REDISPATCH_AFTER_SECONDS``).
REDISPATCH_SECONDS = 15
#: How long each site worker waits between its signature and its upload
#: (``FL_TEST_SLEEP_BEFORE_UPLOAD``): the window in which a scenario restarts the web server or
#: replays an upload while the round is open.
UPLOAD_PAUSE_SECONDS = 1.5
#: libpq's application name of the coordinator's connections (``PGAPPNAME``).
COORDINATOR_APP = "fl-fault-coordinator"
#: ... and of the scoring worker's.
SCORING_APP = "fl-fault-scoring"


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
    broker of its own. Built by :func:`start_cluster`; :meth:`stop` ends everything."""

    root: Path
    broker: Broker
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

    @property
    def vendor(self) -> str:
        """``sqlite`` (the embedded default) or ``postgresql``, from the database URL."""
        return "sqlite" if self.database_url.startswith("sqlite:") else "postgresql"

    @property
    def sqlite_path(self) -> Path:
        assert self.vendor == "sqlite", self.database_url
        return Path(self.database_url.removeprefix("sqlite:///").removeprefix("sqlite://"))

    def central_env(self, **extra: str) -> dict:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "consortium.settings",
            "DATABASE_URL": self.database_url,
            **self.broker.env(),
            "ARTIFACT_ROOT": str(self.artifact_root),
            "SITE_URL": self.central_url,
            "PYTHONUNBUFFERED": "1",
            "FL_CLAIM_LEASE_SECONDS": str(LEASE_SECONDS),
            "FL_REDISPATCH_AFTER_SECONDS": str(REDISPATCH_SECONDS),
            "PYTHONPATH": str(ROOT),
            **extra,
        }
        for key in ("DJANGO_ALLOW_ASYNC_UNSAFE", "CELERY_TASK_ALWAYS_EAGER"):
            env.pop(key, None)
        if self.broker.kind == "filesystem":
            # The embedded default's channel layer is in-memory: no caller's Redis URL.
            env.pop("CHANNEL_LAYER_URL", None)
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
        parts.append(f"--- broker ({self.broker.kind}) ---\n{self.broker.tail(800)}")
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
        self.broker.stop()

    # --- the database ---

    def connect(self, **kwargs):
        """A connection of the test's own to the cluster's database, outside Django: psycopg2's
        on PostgreSQL, sqlite3's (autocommit, no busy wait unless ``timeout`` says) on SQLite."""
        if self.vendor == "sqlite":
            kwargs.setdefault("timeout", 0)
            return sqlite3.connect(self.sqlite_path, isolation_level=None, **kwargs)
        import psycopg2

        return psycopg2.connect(self.database_url, **kwargs)

    def require_postgresql(self, what: str) -> None:
        if self.vendor != "postgresql":
            raise NotImplementedError(f"{what} needs PostgreSQL; this cluster runs on SQLite")

    def coordinator_backends(self) -> list[int]:
        self.require_postgresql("finding the coordinator's backends")
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

    def coordinator_parked(self) -> bool:
        """Whether the coordinator is parked by :func:`hold_table` (:meth:`parked`)."""
        return self.parked(COORDINATOR_APP)

    def scoring_parked(self) -> bool:
        """Whether the scoring worker is parked by :func:`hold_table` (:meth:`parked`)."""
        return self.parked(SCORING_APP)

    def parked(self, app: str) -> bool:
        """Whether the processes of ``app`` (``PGAPPNAME``) are parked by :func:`hold_table`:
        on PostgreSQL, one of their backends waits on a heavyweight lock (the test's); on
        SQLite, where the parked process is the only writer while a scenario parks it, the
        database's write lock has been held for a whole second (by the parking trigger: no
        write of the product takes that long)."""
        if self.vendor == "sqlite":
            for _ in range(5):
                if not self._sqlite_write_locked():
                    return False
                time.sleep(0.25)
            return self._sqlite_write_locked()
        with contextlib.closing(self.connect()) as conn, conn.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s "
                "AND wait_event_type = 'Lock'",
                [app],
            )
            return cur.fetchone()[0] > 0

    def _sqlite_write_locked(self) -> bool:
        """Whether another connection holds the SQLite database's write lock now."""
        with contextlib.closing(self.connect()) as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    return True
                raise
            conn.execute("ROLLBACK")
            return False


#: The rows the SQLite parking trigger counts, four times over (about 4e9 combinations: half a
#: minute or more of one core; the scenario kills the coordinator long before).
_PARK_ROWS = 250


def hold_table(cluster: FaultCluster, table: str):
    """While the block runs, a process that inserts into ``table`` waits inside its
    transaction, which stays uncommitted; reads go on."""
    if cluster.vendor == "sqlite":
        return _busy_insert_sqlite(cluster, table)
    return _lock_table_postgresql(cluster, table)


@contextlib.contextmanager
def _lock_table_postgresql(cluster: FaultCluster, table: str) -> Iterator[None]:
    """``LOCK TABLE ... IN SHARE MODE`` on a connection of the test's own."""
    import psycopg2

    conn = cluster.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f'LOCK TABLE "{table}" IN SHARE MODE')
        yield
    finally:
        with contextlib.suppress(psycopg2.Error):
            conn.rollback()
        conn.close()


@contextlib.contextmanager
def _busy_insert_sqlite(cluster: FaultCluster, table: str) -> Iterator[None]:
    """A trigger before each ``INSERT`` into ``table`` that counts a four-way cross join of
    :data:`_PARK_ROWS` rows: the inserting transaction (which holds the database's write
    lock) stays busy, uncommitted, until its process is killed. Dropped when the block ends
    (after the kill; otherwise the drop waits for the count to finish)."""
    trigger = f"fault_park_{table}"
    with contextlib.closing(cluster.connect(timeout=30)) as conn:
        conn.executescript(
            f"""
            BEGIN IMMEDIATE;
            CREATE TABLE IF NOT EXISTS fault_park_rows (n INTEGER);
            DELETE FROM fault_park_rows;
            WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < {_PARK_ROWS})
            INSERT INTO fault_park_rows SELECT n FROM r;
            CREATE TRIGGER "{trigger}" BEFORE INSERT ON "{table}" BEGIN
                SELECT count(*) FROM fault_park_rows a, fault_park_rows b, fault_park_rows c,
                    fault_park_rows d;
            END;
            COMMIT;
            """
        )
    try:
        yield
    finally:
        with contextlib.closing(cluster.connect(timeout=120)) as conn:
            conn.execute(f'DROP TRIGGER IF EXISTS "{trigger}"')


def hold_aggregation(cluster: FaultCluster):
    """While the block runs, no ``GlobalModel`` can be inserted: a coordinator that claims a
    round for aggregation computes the new model and then waits, inside the close's
    transaction (job row locked, claim committed), until the block ends."""
    return hold_table(cluster, "training_globalmodel")


def site_worker_name(slug: str) -> str:
    return f"site-{slug}"


def start_cluster(
    root: Path, c3, broker: Broker, *, database_url: str | None = None
) -> FaultCluster:
    """Start the web server, the coordinator, the scoring worker, beat and one site worker per
    site of ``c3`` on
    ``broker`` (started here if it is not running) and ``database_url`` (the test database's on
    PostgreSQL), and wait until all are ready."""
    if not broker.running():
        broker.start()
    cluster = FaultCluster(
        root=root,
        broker=broker,
        c3=c3,
        database_url=database_url or child_database_url(),
        web_port=free_port(),
    )
    cluster.artifact_root.mkdir(parents=True, exist_ok=True)
    cluster.add("web", server_argv(cluster.web_port), cluster.central_env())
    cluster.add(
        "coordinator",
        celery_worker_argv(queues.CENTRAL_QUEUE, hostname="fault-central@%h"),
        cluster.central_env(PGAPPNAME=COORDINATOR_APP),
    )
    cluster.add(
        "scoring",
        scoring_worker_argv(hostname="fault-scoring@%h"),
        cluster.central_env(PGAPPNAME=SCORING_APP),
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


def point_this_process_at(broker: Broker) -> Callable[[], None]:
    """Make this process's Celery app send to ``broker`` (a test's sends, e.g. the last
    approval's ``job_start`` on the outbox's fast path). Returns the undo.

    Celery reads ``CELERY_BROKER_URL`` from the environment before its configuration
    (``celery.app.utils.Settings.broker_url``), so the variable is pointed at ``broker`` too:
    with only the configuration changed, a suite run against the machine's Redis sent the
    cluster's ``job_start`` there, and the cluster's tick started each job a grace later."""
    import kombu.pools

    from consortium.celery import app

    saved_conf = (app.conf.broker_url, app.conf.broker_transport_options)
    saved_env = {name: os.environ.get(name) for name in _BROKER_ENV}

    def reset():
        kombu.pools.reset()
        app._pool = None
        app.amqp._producer_pool = None

    for name in _BROKER_ENV:
        os.environ.pop(name, None)
    os.environ["CELERY_BROKER_URL"] = broker.url(0)
    app.conf.broker_url = broker.url(0)
    app.conf.broker_transport_options = broker.transport_options()
    reset()

    def undo():
        app.conf.broker_url, app.conf.broker_transport_options = saved_conf
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset()

    return undo


#: The environment variables Celery prefers to its configuration for the broker's address.
_BROKER_ENV = ("CELERY_BROKER_URL", "CELERY_BROKER_READ_URL", "CELERY_BROKER_WRITE_URL")
