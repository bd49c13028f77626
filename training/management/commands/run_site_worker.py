"""Start the Celery worker of one hospital site: ``manage.py run_site_worker``.

It consumes only ``site.<slug>``, one task at a time (``--concurrency 1
--prefetch-multiplier 1 -O fair``; tasks are acknowledged late, so a task whose
worker dies is not acknowledged). With a CUDA GPU it runs the solo pool: the
task then runs in the worker process itself, never in a forked child, so CUDA
is initialised once and in the process that uses it. Whether a GPU is usable is
asked of a short-lived subprocess, so this process never imports torch.

The worker is configured from its environment (``SITE_SLUG``, ``CENTRAL_URL``,
``SITE_TOKEN``, ``SITE_SIGNING_KEY``, ``DATA_ROOT``: see ``training.site.client``)
and checked before it starts; it needs no database.
"""

from __future__ import annotations

import subprocess
import sys

from django.core.management.base import BaseCommand, CommandError

from consortium.celery import app
from training.queues import site_queue
from training.site.client import WorkerConfig, WorkerConfigError


def cuda_available() -> bool:
    """Ask a subprocess, so that CUDA is never initialised in this (parent) process."""
    try:
        done = subprocess.run(  # noqa: S603 - our own interpreter, fixed arguments
            [sys.executable, "-c", "import torch; print(int(torch.cuda.is_available()))"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0 and done.stdout.strip().endswith("1")


def worker_argv(slug: str, *, pool: str, loglevel: str = "INFO") -> list[str]:
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
        # A site worker takes no part in the cluster's gossip: fewer messages on the broker.
        "--without-gossip",
        "--without-mingle",
    ]
    if pool:
        argv += ["--pool", pool]
    return argv


class Command(BaseCommand):
    help = "Run the Celery worker of one site (queue site.<slug>), from the worker's environment."

    def add_arguments(self, parser):
        parser.add_argument(
            "--pool",
            choices=["auto", "prefork", "solo"],
            default="auto",
            help="auto: solo with a CUDA GPU, else prefork with one child.",
        )
        parser.add_argument("--loglevel", default="INFO")
        parser.add_argument(
            "--print-argv", action="store_true", help="Print the worker's arguments and stop."
        )

    def handle(self, *args, **options):
        try:
            config = WorkerConfig.from_env()
        except WorkerConfigError as exc:
            raise CommandError(str(exc)) from None
        pool = options["pool"]
        if pool == "auto":
            pool = "solo" if cuda_available() else "prefork"
        argv = worker_argv(config.site_slug, pool=pool, loglevel=options["loglevel"])
        if options["print_argv"]:
            self.stdout.write(" ".join(argv))
            return
        self.stdout.write(
            f"site worker for {config.site_slug}: queue {site_queue(config.site_slug)}, "
            f"pool {pool}, central {config.central_url}"
        )
        app.worker_main(argv=argv)
