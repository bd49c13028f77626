"""Real site workers on a real broker, against a live central server.

Three ``manage.py run_site_worker`` processes (one per hospital, each with its own
``SITE_SLUG``, token, signing key and data folder) consume ``site.<slug>`` from the
configured broker: kombu's filesystem transport (in a private folder) by default, Redis
when ``CELERY_BROKER_URL`` is set. Their ``CENTRAL_URL`` is pytest-django's live server,
and their ``DATABASE_URL`` points at a SQLite file in a folder that does not exist, so a
single query from a site worker would fail the round.

The coordinator runs in this test process: it consumes the ``central`` queue from the same
broker (the ``round_maybe_close`` messages the upload endpoint sends, the ``job_start`` the
last approval sends), and the ``scoring`` queue as the scoring worker would (the closes'
``round_score`` messages), and runs the tasks here, with a ``rounds_tick`` every second as beat
would. SQLite's in-memory test database is one connection shared with the live server's
thread, so the test thread and the server take turns (one lock around both).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import kombu.pools
import pytest
from django.conf import settings as django_settings
from django.core.handlers.wsgi import WSGIHandler
from kombu import Exchange, Queue

import training.rounds.tasks  # noqa: F401 - registers the tasks this process runs from "central"
from audit.ledger.chain import verify_chain
from consortium.celery import app
from tests.support.fl_harness import make_consortium3, use_artifact_folder
from training import queues
from training.jobs.selectors import job_rounds_unscored
from training.models import ContributionScore, GlobalModel, JobState, Round, SiteUpdate
from training.queues import CENTRAL_QUEUE, SCORING_QUEUE, site_queue
from training.rounds import coordinator

pytestmark = [pytest.mark.worker, pytest.mark.django_db(transaction=True)]

BASE_DIR = Path(django_settings.BASE_DIR)
DB_LOCK = threading.RLock()
FILESYSTEM = django_settings.CELERY_BROKER_URL.startswith("filesystem://")


# --- The broker ---------------------------------------------------------------------------------


@pytest.fixture
def broker(tmp_path):
    """A private broker for this test: its own folders (filesystem), or purged queues (Redis).
    Yields the environment the worker processes need to reach it."""
    env = {}
    saved = app.conf.broker_transport_options
    if FILESYSTEM:
        folder = tmp_path / "broker"
        options = {
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "control_folder": str(folder / "control"),
            "store_processed": False,
            "polling_interval": 0.05,
        }
        for key in ("data_folder_in", "processed_folder", "control_folder"):
            Path(options[key]).mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport_options = options
        env["CELERY_DATA_DIR"] = str(folder)
    _reset_pools()
    yield env
    app.conf.broker_transport_options = saved
    _reset_pools()


def _reset_pools():
    """Forget the broker connections made so far (kombu keeps them per connection, and the
    app caches its pools), so the next message goes to the broker configured now."""
    kombu.pools.reset()
    app._pool = None
    app.amqp._producer_pool = None


def _purge(names):
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            Queue(name, Exchange(name), routing_key=name)(channel).declare()
            channel.queue_purge(name)


# --- The live server, serialised with this thread on SQLite -------------------------------------


@pytest.fixture
def central(live_server, monkeypatch, tmp_path, settings):
    use_artifact_folder(settings, tmp_path / "artifacts")
    original = WSGIHandler.__call__

    def serialised(self, environ, start_response):
        with DB_LOCK:
            return original(self, environ, start_response)

    monkeypatch.setattr(WSGIHandler, "__call__", serialised)
    return live_server


# --- Worker processes ---------------------------------------------------------------------------


class Workers:
    def __init__(self, c3, url, broker_env, tmp_path):
        self.c3, self.url, self.broker_env, self.tmp = c3, url, broker_env, tmp_path
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, slug, **extra_env):
        site = self.c3.site(slug)
        env = {
            **os.environ,
            **self.broker_env,
            **site.env(self.url),
            # The worker has no database: any query would fail on this path.
            "DATABASE_URL": f"sqlite:///{self.tmp}/no-such-folder/forbidden.sqlite3",
            "PYTHONUNBUFFERED": "1",
            **extra_env,
        }
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        log = self.tmp / f"worker-{slug}-{len(self.logs)}.log"
        self.logs[slug] = log
        self.procs[slug] = subprocess.Popen(  # noqa: S603 - our own interpreter and command
            [sys.executable, "manage.py", "run_site_worker", "--pool", "prefork"],
            cwd=BASE_DIR,
            env=env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: kill the pool child with it
        )

    def log_text(self, slug) -> str:
        return self.logs[slug].read_text(errors="replace")

    def wait_ready(self, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(" ready." in self.log_text(slug) for slug in self.procs):
                return
            for slug, proc in self.procs.items():
                if proc.poll() is not None:
                    raise AssertionError(f"worker {slug} exited:\n{self.log_text(slug)}")
            time.sleep(0.1)
        raise AssertionError("workers not ready:\n" + self.dump())

    def kill(self, slug):
        proc = self.procs.pop(slug)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self):
        for slug in list(self.procs):
            proc = self.procs.pop(slug)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(proc.pid, signal.SIGKILL)

    def dump(self) -> str:
        return "\n".join(
            f"--- {s} ---\n{p.read_text(errors='replace')[-4000:]}" for s, p in self.logs.items()
        )


@pytest.fixture
def c3(cast, tmp_path):
    return make_consortium3(cast, tmp_path)


@pytest.fixture
def workers(c3, central, broker, tmp_path):
    _purge([CENTRAL_QUEUE, SCORING_QUEUE, *[site_queue(s.slug) for s in c3.sites]])
    pool = Workers(c3, central.url, broker, tmp_path)
    yield pool
    pool.stop_all()


# --- The coordinator, in this process -------------------------------------------------------------


#: The queues this process consumes: the coordinator's and the scoring worker's.
QUEUES_HERE = (CENTRAL_QUEUE, SCORING_QUEUE)


def run_coordinator(until, *, timeout, workers, tick_every=1.0):
    """Consume ``central`` and ``scoring`` and run their tasks here (with a tick every second)
    until ``until()`` holds. Returns the names of the tasks run."""
    ran = []

    def handle(body, message):
        name = message.headers["task"]
        args, kwargs, _embed = body
        with DB_LOCK:
            app.tasks[name].run(*args, **kwargs)
        ran.append(name)
        message.ack()

    consumed = [Queue(name, Exchange(name), routing_key=name) for name in QUEUES_HERE]
    deadline = time.monotonic() + timeout
    next_tick = time.monotonic() + tick_every
    with (
        app.connection_for_read() as conn,
        conn.Consumer(consumed, callbacks=[handle], accept=["json"]),
    ):
        while time.monotonic() < deadline:
            with DB_LOCK:
                if until():
                    return ran
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.2)
            # Beat ticks whether or not a message came (an idle queue raises TimeoutError).
            if time.monotonic() >= next_tick:
                with DB_LOCK:
                    coordinator.rounds_tick()
                next_tick = time.monotonic() + tick_every
    raise AssertionError(f"timed out; central ran {ran}\n{workers.dump()}")


def _job_state(job):
    job.refresh_from_db()
    return job.state


# --- Tests ----------------------------------------------------------------------------------------


def test_a_short_job_runs_end_to_end_on_real_workers(c3, workers):
    """3 sites, 2 rounds of logistic regression on breast-cancer; one site task delivered
    twice on purpose: one accepted update, the copy does no harm."""
    started = time.monotonic()
    for site in c3.sites:
        workers.start(site.slug)
    with DB_LOCK:
        job = c3.propose_and_approve(rounds=2)  # the approval queues training.job_start
    workers.wait_ready()

    # Wait for round 1 to be sent, then deliver one site's task a second time.
    run_coordinator(
        lambda: Round.objects.filter(job=job, index=1).exists(), timeout=30, workers=workers
    )
    with DB_LOCK:
        rnd = Round.objects.get(job=job, index=1)
        twice = c3.sites[1].slug
        app.send_task(
            queues.SITE_TRAIN.name,
            kwargs={
                "job_id": job.pk,
                "round_index": 1,
                "site": twice,
                "spec_digest": job.spec_digest,
                "start_digest": rnd.global_model_in.digest,
            },
            queue=site_queue(twice),
        )

    run_coordinator(lambda: _job_state(job) in ("completed", "failed"), timeout=60, workers=workers)
    # Each closed round's scoring message came through the broker's "scoring" queue.
    run_coordinator(lambda: not job_rounds_unscored(job.pk), timeout=60, workers=workers)
    with DB_LOCK:
        job.refresh_from_db()
        assert job.state == JobState.COMPLETED, job.end_reason + workers.dump()
        assert ContributionScore.objects.filter(job=job).count() == 6
        for index in (1, 2):
            rnd = Round.objects.get(job=job, index=index)
            assert rnd.state == Round.State.CLOSED
            assert rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED).count() == 3
            assert rnd.global_model_out.metrics["validation_accuracy"] > 0.8
        assert (
            SiteUpdate.objects.filter(round__job=job, institution__slug=twice).count() == 2
        )  # one per round
        assert verify_chain().ok
    # The copy was run by the worker and did nothing (its update was already in).
    deadline = time.monotonic() + 20
    while workers.log_text(twice).count("succeeded in") < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "'status': 'skipped'" in workers.log_text(twice), workers.dump()
    assert "Database access" not in workers.dump() and "OperationalError" not in workers.dump()
    print(f"end-to-end job on real workers: {time.monotonic() - started:.1f} s")


def test_a_cyclic_job_runs_on_real_workers(c3, workers):
    """3 sites, 2 cyclic rounds: each site after the first starts from the previous site's
    result, which is no GlobalModel; the worker fetches it from the site API like any model."""
    from training.fl.aggregate import cyclic_order

    started = time.monotonic()
    for site in c3.sites:
        workers.start(site.slug)
    with DB_LOCK:
        job = c3.propose_and_approve(rounds=2, topology="cyclic")
    workers.wait_ready()
    run_coordinator(lambda: _job_state(job) in ("completed", "failed"), timeout=90, workers=workers)
    with DB_LOCK:
        job.refresh_from_db()
        assert job.state == JobState.COMPLETED, job.end_reason + workers.dump()
        global_digests = set(GlobalModel.objects.filter(job=job).values_list("digest", flat=True))
        slugs = [s.slug for s in c3.sites]
        for index in (1, 2):
            rnd = Round.objects.get(job=job, index=index)
            assert rnd.state == Round.State.CLOSED
            order = cyclic_order(slugs, index - 1)
            rows = [rnd.updates.get(institution__slug=slug) for slug in order]
            assert [u.status for u in rows] == [SiteUpdate.Status.ACCEPTED] * 3
            assert [u.sent_at is not None for u in rows] == [True] * 3
            assert rows[0].start_digest == rnd.global_model_in.digest
            # The later sites were sent intermediate models, all different, none global.
            later = [u.start_digest for u in rows[1:]]
            assert len(set(later)) == 2 and not set(later) & global_digests
            assert rows[0].sent_at < rows[1].sent_at < rows[2].sent_at
        assert rnd.global_model_out.metrics["validation_accuracy"] > 0.8
        assert verify_chain().ok
    text = workers.dump()
    assert "HTTP 404" not in text and "Database access" not in text, text
    print(f"cyclic job on real workers: {time.monotonic() - started:.1f} s")


def test_a_worker_killed_mid_task_does_not_lose_the_round(c3, workers, settings):
    """SIGKILL one site worker while it trains; start it again: the round still closes.

    On the filesystem broker the killed worker's message is gone (kombu deleted it when it
    was fetched), and Redis would only restore it after its visibility timeout: the
    coordinator's tick sends the task again after ``FL_REDISPATCH_AFTER_SECONDS``."""
    settings.FL_REDISPATCH_AFTER_SECONDS = 3
    started = time.monotonic()
    victim = c3.sites[0].slug
    for site in c3.sites:
        extra = {"FL_TEST_SLEEP_BEFORE_UPLOAD": "120"} if site.slug == victim else {}
        workers.start(site.slug, **extra)
    with DB_LOCK:
        job = c3.propose_and_approve(rounds=1)
    workers.wait_ready()

    def victim_sleeping():
        return "sleeping" in workers.log_text(victim)

    run_coordinator(victim_sleeping, timeout=45, workers=workers)
    workers.kill(victim)
    with DB_LOCK:
        update = SiteUpdate.objects.get(round__job=job, institution__slug=victim)
        assert update.status == SiteUpdate.Status.DISPATCHED
    workers.start(victim)  # back, without the sleep
    run_coordinator(lambda: _job_state(job) in ("completed", "failed"), timeout=60, workers=workers)
    with DB_LOCK:
        job.refresh_from_db()
        assert job.state == JobState.COMPLETED, job.end_reason + workers.dump()
        rnd = Round.objects.get(job=job, index=1)
        assert rnd.updates.filter(status=SiteUpdate.Status.ACCEPTED).count() == 3
        assert rnd.updates.get(institution__slug=victim).status == SiteUpdate.Status.ACCEPTED
        assert verify_chain().ok
    print(f"killed-worker recovery: {time.monotonic() - started:.1f} s")
