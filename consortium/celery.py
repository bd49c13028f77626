"""The Celery application. Queue names live in ``training.queues``."""

import contextlib
import os
from pathlib import Path

from celery import Celery, signals
from kombu.transport import TRANSPORT_ALIASES
from kombu.utils.functional import maybe_list

from training.queues import SCORING_QUEUE

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
# The embedded broker writes each message aside and renames it into place (consortium.broker):
# kombu's own filesystem transport lets a consumer read a message before it is written.
TRANSPORT_ALIASES["filesystem"] = "consortium.broker:Transport"

app = Celery("consortium")
app.config_from_object("django.conf:settings", namespace="CELERY")
# The tasks live in training.rounds.tasks (names and queues: training.queues).
app.autodiscover_tasks(["training.rounds"])


@app.on_after_configure.connect
def _create_filesystem_broker_folders(sender, source=None, **kwargs):
    """kombu's filesystem transport expects its folders to exist.

    After configuration, not on it: reading ``sender.conf`` inside ``on_configure`` starts
    the configuration again (a RecursionError the signal dispatcher only logs)."""
    options = (source if source is not None else sender.conf).broker_transport_options or {}
    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        if options.get(key):
            Path(options[key]).mkdir(parents=True, exist_ok=True)


def _queues_of(options: dict | None) -> list[str]:
    """The queues a worker was started on (``-Q a,b`` or ``-Q a -Q b``); empty without -Q."""
    return [
        q.strip()
        for item in maybe_list((options or {}).get("queues")) or []
        for q in str(item).split(",")
        if q.strip()
    ]


@signals.celeryd_init.connect
def _coordinator_polls_faster(sender=None, conf=None, options=None, **kwargs):
    """On the embedded broker, a worker that consumes the coordinator's queue looks for
    messages every ``EMBEDDED_BROKER_CENTRAL_POLL_SECONDS`` instead of the site workers' pace.

    The last upload of a round asks the coordinator to close it through the broker, and the
    next round waits for that pick-up; one process polling faster costs little, ten site
    workers doing so would not (settings, ``EMBEDDED_BROKER_POLL_SECONDS``). The scoring worker
    (``-Q scoring``) keeps the sites' pace too: no round waits for its pick-up, and 50 ms is
    nothing beside a round's scoring; a coordinator that also consumes ``scoring`` (``-Q
    central,scoring``) polls both at its own pace. Before the worker connects, so its
    consumer's transport takes it."""
    from django.conf import settings  # not at the top: this module loads before the settings

    global _serves_central
    conf = conf if conf is not None else app.conf
    queues = _queues_of(options)
    _serves_central = not queues or conf.task_default_queue in queues  # no -Q: default only
    transport = dict(conf.broker_transport_options or {})
    if "polling_interval" not in transport:
        return  # not the embedded broker (Redis, RabbitMQ: no polling)
    if _serves_central:
        transport["polling_interval"] = settings.EMBEDDED_BROKER_CENTRAL_POLL_SECONDS
        conf.broker_transport_options = transport


#: Whether this worker consumes the coordinator's queue (set by ``celeryd_init`` above).
_serves_central = False


@signals.celeryd_init.connect
def _scoring_runs_behind_the_rounds(sender=None, conf=None, options=None, **kwargs):
    """A worker that consumes only the scoring queue lowers its CPU priority by
    ``SCORING_WORKER_NICENESS`` before its pool starts (the pool's processes inherit it).

    A round's scores are background work: nothing waits for them but the report. Where the
    scoring worker shares cores with the coordinator, the site API and the database (one
    machine, as docs/deploy lays it out), at the same priority it takes a full share of them
    while the next round runs, and that round's close waits for the CPU. At a lower priority it
    takes what the rounds leave. A coordinator that also scores (``-Q central,scoring``) keeps
    its priority: its rounds would wait too."""
    from django.conf import settings  # not at the top: this module loads before the settings

    niceness = settings.SCORING_WORKER_NICENESS
    if set(_queues_of(options)) != {SCORING_QUEUE} or not niceness:
        return
    os.nice(niceness)
    # Where the kernel groups processes by session (autogroup, the default on desktops and many
    # servers), a process's nice value only ranks it within its session: a worker that leads its
    # own session (systemd's units, the demo's and the benchmarks' processes) lowers the
    # session's too. Under systemd's cgroups the unit's CPUWeight does that (fl-scoring.service).
    if os.getsid(0) == os.getpid():
        with contextlib.suppress(OSError):
            Path("/proc/self/autogroup").write_text(f"{niceness}\n")


@signals.celeryd_init.connect
def _workers_keep_their_database_connections(sender=None, conf=None, options=None, **kwargs):
    """On PostgreSQL a worker keeps its database connection between tasks for
    ``WORKER_DATABASE_CONN_MAX_AGE`` seconds (settings: why; Daphne cannot, a worker can).

    In the worker's main process, before its pool starts: the pool's processes inherit the
    setting, and Django reads it when a connection opens. SQLite (the embedded default) keeps
    a connection per task: opening a file costs next to nothing."""
    from django.conf import settings  # not at the top: this module loads before the settings

    for config in settings.DATABASES.values():
        if "postgresql" in config.get("ENGINE", ""):
            config["CONN_MAX_AGE"] = settings.WORKER_DATABASE_CONN_MAX_AGE


@signals.task_prerun.connect
@signals.task_postrun.connect
def _replace_broken_or_expired_connections(sender=None, **kwargs):
    """Before and after each task, what Django does before and after each request: a
    connection that broke or outlived its ``CONN_MAX_AGE`` is closed (the next query opens a
    new one), the others are kept and checked before their next use (``CONN_HEALTH_CHECKS``).
    With ``CONN_MAX_AGE`` 0 every connection is closed, as Celery's fix-up did. Not for a task
    run eagerly (a test, in the caller's transaction), which Celery's fix-up leaves alone too."""
    request = getattr(sender, "request", None)
    if getattr(request, "is_eager", False):
        return
    from django.db import close_old_connections

    close_old_connections()


@signals.worker_ready.connect
def _start_outbox_relay(sender=None, **kwargs):
    """The coordinator's worker relays the outbox and writes the coordinator's heartbeat
    (training.outbox, training.liveness), in a thread of its main process: so every way of
    running the coordinator (systemd, the demo, the tests' workers) has exactly what keeps a
    broker outage from dropping messages, and a dead coordinator shows. Site workers do not
    (they hold no database credentials), nor does the scoring worker (``-Q scoring``): the
    messages it writes (the sites' evaluation tasks) are published on its own commit, and
    any the broker refuses wait for the coordinator's relay."""
    if _serves_central:
        from training.liveness import start_coordinator_thread

        start_coordinator_thread()


@signals.worker_shutdown.connect
def _stop_outbox_relay(sender=None, **kwargs):
    if _serves_central:
        from training.liveness import stop_coordinator_thread

        stop_coordinator_thread()
