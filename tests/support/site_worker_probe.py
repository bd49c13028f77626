"""A real site worker with one task of the tests': ``python -m tests.support.site_worker_probe
SLUG``.

It is the project's Celery app (``consortium.celery``, configured from the settings like every
worker) started with ``run_site_worker``'s own ``worker_argv``, so it consumes ``site.<SLUG>``
with exactly the site worker's flags; the task it is sent (``PROBE_TASK``) writes the file it
is given, which proves that a message reached the worker and ran. ``run_site_worker`` itself
would first check the central server (its start-up checks), which these broker tests have none
of.
"""

from __future__ import annotations

import sys
from pathlib import Path

import django

django.setup()

from consortium.celery import app  # noqa: E402 - after django.setup()
from tests.support.rabbitmq import PROBE_TASK  # noqa: E402
from training.management.commands.run_site_worker import worker_argv  # noqa: E402


@app.task(name=PROBE_TASK, ignore_result=True)
def probe(path: str) -> None:
    Path(path).write_text("ran")


if __name__ == "__main__":
    app.worker_main(argv=worker_argv(sys.argv[1], pool="prefork", loglevel="INFO"))
