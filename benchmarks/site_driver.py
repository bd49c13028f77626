"""Many hospitals' site workers in one process, for the scale benchmark (``round_scale.py``).

A real site worker is a process per hospital (``manage.py run_site_worker``): about 130 MiB
for its main process and 450 MiB for the pool child that trains. A thousand of them do not fit
on one machine, yet what the benchmark measures is the centre's side of a thousand sites: the
server, the coordinator, the broker and the database, all real. So this module runs the sites'
real code for many sites in one Celery worker process:

* it consumes the sites' real queues (``site.<slug>``, one per site, on the real broker) and
  runs the real task body, :func:`training.site.worker.run_site_round`, with each site's own
  configuration and client: the ledger witnessed (a checkpoint checked against the last one
  the site saw, with its consistency proof, and cosigned), the model fetched and its digests
  checked, the job's spec checked against its digest, local training on the site's own CSV,
  the update packed, signed with the site's own Ed25519 key and uploaded, all over HTTP;
* it sends every site's heartbeat at the interval a site worker uses
  (``SITE_HEARTBEAT_SECONDS``, 30 s by default), spread over the interval, since a thousand
  sites' heartbeats are part of what the centre serves.

What differs from a site worker: tasks of many sites share one process and a thread pool (the
benchmark's caller picks how many processes and threads), and the cache of checked job specs
holds every site's entry (a real worker holds its own site's only; the default cache of 16
would make each site fetch the job again every round here, which no real site does).

Run by ``round_scale.py`` as ``python -m celery -A site_driver worker -Q <queues> --pool
threads`` with ``benchmarks`` on the path, ``SITE_DRIVER_SITES`` naming a JSON file with the
sites it plays (``slug``, ``token``, ``key_path``, ``data_root``), ``CENTRAL_URL`` and
``CELERY_BROKER_URL`` in its environment, and a ``DATABASE_URL`` that leads nowhere (a site
has no database).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys
import threading
import time
from pathlib import Path

import django

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
django.setup()

from celery import Celery, signals  # noqa: E402 - after Django's settings, as a site worker

from training import queues  # noqa: E402
from training.site import worker as site_worker  # noqa: E402
from training.site.client import CentralClient, WorkerConfig  # noqa: E402
from training.site.heartbeat import Heartbeat  # noqa: E402

log = logging.getLogger("site_driver")


def _load_sites() -> dict[str, WorkerConfig]:
    url = os.environ["CENTRAL_URL"].rstrip("/")
    heartbeat = float(os.environ.get("SITE_HEARTBEAT_SECONDS") or 30.0)
    sites = json.loads(Path(os.environ["SITE_DRIVER_SITES"]).read_text())
    return {
        s["slug"]: WorkerConfig(
            site_slug=s["slug"],
            central_url=url,
            token=s["token"],
            signing_key_path=Path(s["key_path"]),
            data_root=Path(s["data_root"]),
            heartbeat_seconds=heartbeat,
        )
        for s in sites
    }


CONFIGS = _load_sites()
CLIENTS = {slug: CentralClient(config) for slug, config in CONFIGS.items()}
# Every site played here keeps its checked spec, as its own worker would (see the docstring).
site_worker._SPECS_KEPT = max(site_worker._SPECS_KEPT, 4 * len(CONFIGS))

app = Celery("site-driver", broker=os.environ["CELERY_BROKER_URL"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=True,
)


@app.task(name=queues.SITE_TRAIN.name, ignore_result=True, acks_late=True)
def site_train(
    *,
    job_id: int,
    round_index: int,
    site: str,
    spec_digest: str,
    start_digest: str = "",
    global_digest: str = "",
) -> dict:
    """The site task of ``training.rounds.tasks.site_train``, for whichever site it names
    among those played here (a task for another site is an error: it was routed to a queue
    this process consumes, which only its site's sender does)."""
    config = CONFIGS[site]
    return site_worker.run_site_round(
        job_id=job_id,
        round_index=round_index,
        site=site,
        spec_digest=spec_digest,
        start_digest=start_digest or global_digest,
        config=config,
        client=CLIENTS[site],
    )


class Heartbeats:
    """Every site's heartbeat, once per interval each, spread evenly over the interval (a
    thousand workers started at different times do not beat at the same instant)."""

    def __init__(self) -> None:
        self.beats = [Heartbeat(client, device="cpu") for client in CLIENTS.values()]
        self.stop = threading.Event()

    def run(self) -> None:
        if not self.beats:
            return
        interval = self.beats[0].interval
        random.Random(os.getpid()).shuffle(self.beats)
        for beat in self.beats:  # all online before the first task, as started workers are
            beat.beat()
        while not self.stop.is_set():
            started = time.monotonic()
            for number, beat in enumerate(self.beats):
                due = started + interval * (number + 1) / len(self.beats)
                if self.stop.wait(max(0.0, due - time.monotonic())):
                    return
                beat.beat()


_heartbeats = Heartbeats()


@signals.worker_ready.connect
def _start_heartbeats(sender=None, **_kwargs) -> None:
    interval = _heartbeats.beats[0].interval if _heartbeats.beats else 0.0
    log.info("site driver ready: %d sites, heartbeat every %.0f s", len(CONFIGS), interval)
    threading.Thread(target=_heartbeats.run, name="site-heartbeats", daemon=True).start()


@signals.worker_shutdown.connect
def _stop_heartbeats(sender=None, **_kwargs) -> None:
    _heartbeats.stop.set()


def queue_names() -> list[str]:
    """The queues of the sites played here (``-Q``)."""
    return [queues.site_queue(slug) for slug in CONFIGS]
