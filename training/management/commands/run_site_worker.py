"""Start the Celery worker of one hospital site: ``manage.py run_site_worker``.

It consumes only ``site.<slug>``, one task at a time (``--concurrency 1
--prefetch-multiplier 1 -O fair``; tasks are acknowledged late, so a task whose
worker dies is not acknowledged). It runs the prefork pool with one child, also with a CUDA
GPU: this process never imports torch (see below), so CUDA is first initialised in the child
that trains, which is safe, and the pool enforces the tasks' time limits
(``training.queues.task_time_limits``: under the broker's consumer timeout). ``--pool solo``
runs the task in the worker process itself; Celery's solo pool enforces no time limit, so
there the broker's timeout is the only one.

The worker is configured from its environment (``SITE_SLUG``, ``CENTRAL_URL``,
``SITE_TOKEN``, ``SITE_SIGNING_KEY``, ``DATA_ROOT``, optionally ``SITE_CA_BUNDLE`` and
``SITE_HEARTBEAT_SECONDS``: see ``training.site.client``) and needs no database.

``--check`` runs the worker's checks (``training.site.checks``: the central server and its
TLS, the site protocol, the token, the signing key, the broker account, the registered data
sets under ``DATA_ROOT``), one line each, and exits non-zero when one fails. Without it the
worker runs the same checks before it starts and refuses to start, saying why, when one
fails (the embedded broker with a ``CENTRAL_URL`` on another machine among them); a central
server that does not answer yet is waited for (``CENTRAL_WAIT_SECONDS``) first, so a worker
started with its server does not fail on the server's start-up. At start
they run in a short-lived subprocess (``--check --json``), which also names the device the
worker trains on (``cuda:<name>`` or ``cpu``): the data check loads the data sets with
torch, and this process must never import torch (CUDA must not be initialised before
the pool forks). Once Celery says the worker is ready, a thread reports it online every
``SITE_HEARTBEAT_SECONDS`` (``training.site.heartbeat``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from consortium.celery import app
from training.queues import site_queue
from training.site.checks import Check, checks_json, run_checks, wait_for_central
from training.site.client import CentralClient, WorkerConfig, WorkerConfigError
from training.site.heartbeat import Heartbeat, start_on_worker_ready

#: How long the start-up checks may take (they load every registered data set).
CHECK_TIMEOUT_SECONDS = 1800
#: How long a starting worker waits for its central server to answer at all (see
#: ``training.site.checks.wait_for_central``) before it runs its checks.
CENTRAL_WAIT_SECONDS = 120


def _device_from(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    return last if last == "cpu" or last.startswith("cuda:") else "cpu"


def _device_here() -> str:
    """The device, from this process: only in the ``--check`` process (it imports torch)."""
    try:
        import torch  # the check process only, never the parent
    except ImportError:
        return "cpu"
    return "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def _self_command() -> list[str]:
    """How to run this command again in a subprocess."""
    manage = Path(settings.BASE_DIR) / "manage.py"
    if manage.is_file():
        return [sys.executable, str(manage), "run_site_worker"]
    return [sys.executable, "-m", "django", "run_site_worker"]


def worker_argv(
    slug: str, *, pool: str, loglevel: str = "INFO", broker_url: str | None = None
) -> list[str]:
    """The Celery worker's arguments for the site ``slug`` on ``broker_url`` (the settings'
    ``CELERY_BROKER_URL`` by default).

    The site worker consumes its queue and does nothing else on the broker, so that its own
    broker account, allowed only ``site.<slug>`` (``training.site.broker``), is enough: no
    gossip, mingle or heartbeats (they publish to ``celeryev``), no task events, and no remote
    control (its ``celery.pidbox`` exchange and ``<host>.celery.pidbox`` queue). Celery has no
    option for the last two, so they are set as configuration (``name=value`` arguments, which
    the worker command applies to this worker only; the coordinator keeps its remote control).
    With any of them on, a restricted account is refused (ACCESS_REFUSED) and the worker either
    stops (remote control) or retries in a loop (heartbeats): measured on RabbitMQ 3.10.8.

    On Redis, remote control stays on: there a site worker holding a task when Redis restarts
    empty reconnects, fails to acknowledge the task ("Couldn't ack ... ConnectionError") and
    never consumes again when remote control is off (kombu 5.7, redis-py 8.2; every run of the
    fault suite's "broker down during uploads", tests/faults); with it on, 3 runs of 3
    recovered. Redis has no per-queue accounts to refuse the pidbox, so nothing is lost."""
    if broker_url is None:
        broker_url = settings.CELERY_BROKER_URL
    argv = [
        "worker",
        "-Q",
        site_queue(slug),
        "--concurrency",
        "1",
        "--prefetch-multiplier",
        "1",
        "-O",
        "fair",
        "--hostname",
        f"site-{slug}@%h",
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "worker_send_task_events=False",
    ]
    if not broker_url.startswith(("redis://", "rediss://")):
        argv.append("worker_enable_remote_control=False")
    if pool:
        argv += ["--pool", pool]
    return argv


class Command(BaseCommand):
    help = (
        "Run the Celery worker of one site (queue site.<slug>), from the worker's environment; "
        "--check only checks that it can work."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--pool",
            choices=["auto", "prefork", "solo"],
            default="auto",
            help="auto (the default): prefork with one child, with or without a GPU; solo runs "
            "tasks in the worker process and enforces no time limit.",
        )
        parser.add_argument("--loglevel", default="INFO")
        parser.add_argument(
            "--print-argv", action="store_true", help="Print the worker's arguments and stop."
        )
        parser.add_argument(
            "--check",
            action="store_true",
            help="Check the central server, TLS, protocol, token, signing key, broker account "
            "and data sets, one line each; exit non-zero when one fails. Starts nothing.",
        )
        parser.add_argument(
            "--json",
            action="store_true",
            help="With --check: one JSON line (the checks and the device), for the worker's "
            "own start.",
        )

    def handle(self, *args, **options):
        try:
            config = WorkerConfig.from_env()
        except WorkerConfigError as exc:
            raise CommandError(str(exc)) from None
        if options["check"]:
            return self._check(config, as_json=options["json"])
        pool = options["pool"]
        if options["print_argv"]:
            if pool == "auto":
                pool = "prefork"
            argv = worker_argv(config.site_slug, pool=pool, loglevel=options["loglevel"])
            self.stdout.write(" ".join(argv))
            return
        wait_for_central(CentralClient(config), limit=CENTRAL_WAIT_SECONDS, say=self.stdout.write)
        checks, device = self._checks_before_start()
        for check in checks:
            self.stdout.write(check.line)
        failed = [c for c in checks if c.status == "failed"]
        if failed:
            raise CommandError(
                f"the site worker does not start: {len(failed)} check(s) failed "
                f"({', '.join(c.name for c in failed)}); see above, and run "
                "`manage.py run_site_worker --check` again once fixed."
            )
        if pool == "auto":
            pool = "prefork"  # time limits enforced; CUDA starts in the child (docstring)
        argv = worker_argv(config.site_slug, pool=pool, loglevel=options["loglevel"])
        heartbeat = Heartbeat(CentralClient(config), device=device)
        start_on_worker_ready(heartbeat)
        self.stdout.write(
            f"site worker for {config.site_slug}: queue {site_queue(config.site_slug)}, "
            f"pool {pool}, device {device}, central {config.central_url}, heartbeat every "
            f"{heartbeat.interval:g} s"
        )
        app.worker_main(argv=argv)

    def _check(self, config: WorkerConfig, *, as_json: bool):
        checks = run_checks(config, broker_url=settings.CELERY_BROKER_URL)
        device = _device_here()
        failed = [c for c in checks if c.status == "failed"]
        if as_json:
            self.stdout.write(checks_json(checks, device=device))
        else:
            for check in checks:
                self.stdout.write(check.line)
            self.stdout.write(f"device: {device}")
        if failed:
            raise CommandError(
                f"{len(failed)} of {len(checks)} checks failed: "
                + ", ".join(c.name for c in failed)
            )
        if not as_json:
            self.stdout.write(f"all {len(checks)} checks passed")

    def _checks_before_start(self) -> tuple[list[Check], str]:
        """The checks and the device, from ``--check --json`` in a subprocess (see the module
        docstring: torch stays out of this process)."""
        try:
            done = subprocess.run(  # noqa: S603 - our own interpreter and command
                [*_self_command(), "--check", "--json"],
                capture_output=True,
                text=True,
                timeout=CHECK_TIMEOUT_SECONDS,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise CommandError(f"the site worker's checks did not finish: {exc}") from None
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        try:
            report = json.loads(lines[-1])
            checks = [Check.from_json(c) for c in report["checks"]]
        except (IndexError, ValueError, KeyError, TypeError):
            tail = (done.stderr or done.stdout).strip()[-2000:]
            raise CommandError(f"the site worker's checks did not run: {tail}") from None
        return checks, _device_from(report.get("device", "cpu"))
