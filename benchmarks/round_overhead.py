#!/usr/bin/env python
"""Round overhead benchmark: wall time per round minus the sites' local compute.

    .venv/bin/python benchmarks/round_overhead.py [--sites 10] [--rounds 10] [--warmup 2]
        [--evaluation central|sites]

Ten sites train a tiny model (logistic regression on the bundled breast-cancer set, each
site its own share as a CSV file) through the real platform: the central server (Daphne),
the coordinator (a Celery worker with beat on ``central``), the scoring worker (a Celery
worker on ``scoring``: each round's contribution scores, off the rounds' critical path) and
one ``manage.py run_site_worker`` process per site, on whatever broker and database the
environment names.
Every round goes the whole way: dispatch through the broker, the job and the model fetched
over the site API, local training, signing, upload, central verification (digest, Ed25519
signature, tensors), the ledger entries, the round closed by the last upload, aggregation,
evaluation on the validation set, and the next round opened.

Per measured round (the first ``--warmup`` rounds are left out: worker processes import
torch and warm their caches there) it reports

* wall: from the round's opening to the next round's opening (``Round.opened_at``);
* local compute: each site's own ``train_local`` time, which the site reports in its update's
  metrics (``train_seconds``); the critical path is the slowest site's, since every site
  trains at once in its own process;
* overhead = wall - critical path of local compute;

and where the overhead goes, from the rows' timestamps and the site workers' phase timings.

When ``flwr`` is importable (``pip install -e '.[bench]'``), the same workload (same model and
initial weights, same data split, same local training function, same rounds, FedAvg weighted
by samples, central evaluation after each round) runs in Flower in the same invocation,
measured the same way (a round opens when its training is configured; local compute is each
client's ``train_local`` time), and the ratio of each overhead to the platform's is printed:

* Flower's Ray-based simulation (``run_flower``): every client in this process's Ray actors;
* Flower's deployment runtime (``run_flower_deployment``, when Flower's executables are
  beside this Python or on the PATH; ``--no-flower-deployment`` skips it): a SuperLink and
  one SuperNode per site as processes of their own (insecure, on 127.0.0.1), the app in
  ``benchmarks/flower_deployment`` submitted with ``flwr run``, its ServerApp and ClientApps
  run by Flower's runtime, as a consortium would run Flower.

``--evaluation sites`` has the sites evaluate each round's model (and the coalition models
the contribution scores need) on records they keep aside, as a consortium without a central
validation set does, and prints the evaluation's round-trip from the rows' timestamps: the
model stored → the sites asked → each site's report → the last one → the evaluation closed.
Flower runs its central evaluation either way: compare the round-trip with the platform's
own round, not with Flower.

Flower's simulation runs twice, before and after the platform, and the platform's ratio is
printed against each and against the faster of the two: what a run leaves behind (its
database's clean-up, its processes' exit) can slow whatever comes right after it, and a ratio
that falls because its anchor ran slow is no gain (docs/performance.md, "The ledger's group
commit"). The faster anchor's ratio is the conservative figure.

``--no-flower`` skips Flower, ``--flower-only`` runs only it (its simulation once). Where
flwr's own pins conflict with the project's environment, install it into a virtualenv of its
own that also sees the project's (a ``.pth`` file that calls ``site.addsitedir`` on the
project venv's site-packages) and run this script with that venv's Python.

Database: on PostgreSQL (``DATABASE_URL``) the benchmark creates and drops
``flc_bench_rounds`` on that server; on SQLite it uses a temporary file. The broker is
``CELERY_BROKER_URL`` (its queues are purged first: give it a database of its own, e.g.
``redis://127.0.0.1:6379/2``), else the embedded filesystem broker in a temporary folder.
Artifacts and logs go to a temporary folder (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
BENCH_DB = "flc_bench_rounds"
DATASET = "breast-cancer"
MODEL = {"name": "logistic_regression", "params": {}}
LOCAL = {
    "local_epochs": 1,
    "batch_size": 32,
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.0},
}
#: The site API's server among the benchmark's processes (not "site-...": those are the sites).
SITE_API_PROCESS = "central-site-api"
PHASES_RE = re.compile(r"job #(\d+) round (\d+): update .*; seconds: (.*)$")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, default=10, help="number of sites (default 10)")
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="rounds left out (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole run")
    parser.add_argument(
        "--no-flower", action="store_true", help="skip Flower (simulation and deployment runtime)"
    )
    parser.add_argument(
        "--flower-only",
        action="store_true",
        help="run only Flower (its simulation and its deployment runtime)",
    )
    parser.add_argument(
        "--no-flower-deployment",
        action="store_true",
        help="skip Flower's deployment runtime (SuperLink and SuperNodes as processes)",
    )
    parser.add_argument(
        "--flower-actors",
        type=int,
        default=0,
        help="Flower clients training at once (Ray actors, one CPU each); default: one per "
        "core, Flower's own default (ten at once did not finish on a 2-core machine)",
    )
    parser.add_argument(
        "--evaluation",
        choices=["central", "sites"],
        default="central",
        help="where the job's models are evaluated: on the consortium's validation set (the "
        'default) or at the sites ({"where": "sites"}: each site evaluates the round\'s model '
        "and the coalition models on records it keeps aside); with sites, the evaluation "
        "round-trip is printed too",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    return parser.parse_args()


# --- a throwaway database, broker and artifact store ------------------------------------------


def prepare_database(var: Path) -> tuple[str, callable]:
    """A fresh database (``flc_bench_rounds`` on PostgreSQL, ``var/bench.sqlite3`` on SQLite,
    where the server and the coordinator open it too): the ledger benchmark's helper."""
    import ledger as bench_ledger

    bench_ledger.BENCH_DB = BENCH_DB
    return bench_ledger.prepare_database(var)


def prepare_environment(var: Path) -> str:
    """The settings every process of the run shares (this one and its children)."""
    os.environ["DJANGO_SETTINGS_MODULE"] = "consortium.settings"
    os.environ["DJANGO_DEBUG"] = "false"  # DEBUG keeps every query: not production
    os.environ["ARTIFACT_ROOT"] = str(var / "artifacts")
    os.environ["EMAIL_URL"] = "dummymail://"
    os.environ.setdefault("LOG_LEVEL", "INFO")
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if not broker or broker.startswith("filesystem://"):
        os.environ["CELERY_BROKER_URL"] = "filesystem://"
        os.environ["CELERY_DATA_DIR"] = str(var / "broker")
        return f"embedded filesystem broker (under {var / 'broker'})"
    return f"{urlsplit(broker).scheme} at {urlsplit(broker).netloc}{urlsplit(broker).path}"


def setup_django():
    import logging

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)


def purge_queues(names: list[str]) -> None:
    from kombu import Exchange, Queue

    from consortium.celery import app

    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for name in names:
            Queue(name, Exchange(name), routing_key=name)(channel).declare()
            channel.queue_purge(name)


# --- the consortium ------------------------------------------------------------------------


@dataclass
class BenchSite:
    slug: str
    institution: object
    approver: object
    token: str
    key_path: Path
    data_root: Path
    records: int


def site_slugs(n: int) -> list[str]:
    return [f"bench-{i:02d}" for i in range(1, n + 1)]


def write_csv(folder: Path, data, *, jitter_seed: int | None = None) -> None:
    """The site's share as a CSV file. ``jitter_seed``: each feature scaled by a factor within
    1e-4 of 1, drawn from that seed, so that sites holding the same share still hold data (and
    send updates) of their own: the centre refuses an update whose bytes another site sent."""
    import csv

    import numpy as np

    x_train = data.x_train.numpy().astype("float64")
    if jitter_seed is not None:
        rng = np.random.default_rng(jitter_seed)
        x_train = x_train * (1 + 1e-4 * rng.uniform(-1, 1, size=x_train.shape))
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / f"{DATASET}.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([f"f{i}" for i in range(x_train.shape[1])] + ["label"])
        for x, y in zip(x_train.tolist(), data.y_train.tolist(), strict=True):
            writer.writerow([repr(v) for v in x] + [int(y)])


def seed_consortium(n_sites: int, var: Path, *, shares: int | None = None):
    """A consortium of ``n_sites`` hospitals under an agreement in force, each offering its share
    of the data set with site credentials; everything through the services (and the ledger).

    ``shares``: split the data set ``shares`` ways only and give site ``i`` share ``i % shares``,
    its features perturbed by a factor within 1e-4 of 1 of its own (``write_csv``): each site's
    work stays the same whatever the number of sites, which is what a per-site cost compares,
    and a thousand sites do not need a thousand distinct shares of a 569-record set."""
    from django.contrib.auth import get_user_model

    from consortium.governance.models import Role
    from consortium.governance.services.agreements import (
        agreement_create,
        agreement_sign,
        agreement_version_publish,
    )
    from consortium.governance.services.institutions import consortium_create, institution_create
    from consortium.governance.services.members import membership_grant
    from training.fl.data import demo_split
    from training.fl.signing import generate_keypair
    from training.jobs.datasets import dataset_register
    from training.rounds.credentials import site_credential_create

    User = get_user_model()
    admin = User.objects.create_user("bench-admin", is_staff=True, is_superuser=True)
    consortium = consortium_create(
        acting_user=admin, name="Round overhead benchmark", slug="bench-rounds"
    )
    slugs = site_slugs(n_sites)
    templates = site_slugs(shares) if shares else slugs
    split = demo_split(DATASET, templates)
    sites = []
    for number, slug in enumerate(slugs):
        institution = institution_create(
            acting_user=admin, consortium=consortium, name=f"Hospital {slug}", slug=slug
        )
        approver = User.objects.create_user(f"approver-{slug}", first_name="Approver")
        membership_grant(
            acting_user=admin,
            user=approver,
            consortium=consortium,
            role=Role.APPROVER,
            institution=institution,
        )
        data = split[templates[number % len(templates)]]
        root = var / "sites" / slug / "data"
        write_csv(root, data, jitter_seed=number if shares else None)
        dataset_register(
            acting_user=admin,
            institution=institution,
            key=DATASET,
            description=f"{DATASET} at {slug}",
            modality="tabular",
            num_records=data.num_records,
            input_shape=[30],
            n_classes=2,
        )
        private_pem, public_pem = generate_keypair()
        key_path = var / "sites" / slug / "signing-key.pem"
        key_path.write_bytes(private_pem)
        key_path.chmod(0o600)
        _credential, token = site_credential_create(
            acting_user=admin, institution=institution, label="bench", public_key=public_pem
        )
        sites.append(
            BenchSite(slug, institution, approver, token, key_path, root, data.num_records)
        )
    today = dt.date.today()
    version = agreement_create(
        acting_user=admin,
        consortium=consortium,
        title="Benchmark agreement",
        purpose="Measure the platform's overhead per round.",
        permitted_purposes=["classification"],
        permitted_model_families=["linear"],
        max_shared_fraction="1",
        required_dp_mechanism="none",
        epsilon_cap="8",
        delta="0.00001",
        valid_from=today - dt.timedelta(days=1),
        valid_until=today + dt.timedelta(days=30),
        text="A benchmark: the parties share model updates only.",
    )
    version = agreement_version_publish(acting_user=admin, version=version)
    for site in sites:
        agreement_sign(
            acting_user=site.approver,
            version=version,
            institution=site.institution,
            typed_name="Approver",
            confirmed=True,
            expected_digest=version.content_digest,
        )
    return admin, consortium, sites


def job_spec(slugs: list[str], rounds: int, evaluation: str = "central") -> dict:
    spec = {
        "purpose": "classification",
        "participants": list(slugs),
        "dataset_key": DATASET,
        "model": MODEL,
        "topology": "fedavg",
        "rounds": rounds,
        **LOCAL,
        "momentum_restart": True,
        "privacy_pipeline": [],
        "min_participants": len(slugs),
        "round_timeout_seconds": 600,
        "approval_ttl_hours": 24,
    }
    if evaluation != "central":
        spec["evaluation"] = {"where": evaluation}
    return spec


def propose_and_approve(admin, consortium, sites, rounds: int, evaluation: str = "central"):
    from training.jobs.approvals import approval_decide
    from training.jobs.proposals import job_propose
    from training.models import Approval

    job = job_propose(
        acting_user=admin,
        consortium=consortium,
        title="Round overhead benchmark",
        spec=job_spec([s.slug for s in sites], rounds, evaluation),
    )
    for site in sites:  # the last approval queues training.job_start on "central"
        approval_decide(
            acting_user=site.approver,
            job=job,
            institution=site.institution,
            decision=Approval.Decision.APPROVED,
            spec_digest=job.spec_digest,
            agreement_version_id=job.agreement_version_id,
            reason="benchmark",
        )
    job.refresh_from_db()
    return job


# --- the processes -----------------------------------------------------------------------------


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:  # noqa: S310 - our own URL
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start_central(sup, var: Path, *, site_api: bool = True) -> tuple[str, str]:
    """The central processes as docs/deploy runs them: the server (Daphne: pages, API,
    websockets), the site API's own server (gunicorn, ``fl-site-api.service``), the coordinator
    (a Celery worker with beat on ``central``) and the scoring worker. Returns the server's URL
    and the URL the sites are given (``site_api=False``: Daphne serves the sites too, the
    layout before the site API had a server of its own, for comparison)."""
    from training.demo.processes import celery_worker_argv, free_port, scoring_worker_argv
    from training.queues import CENTRAL_QUEUE

    python = sys.executable
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"}
    # Under ASGI Django runs each request's view in a thread of its own, and a persistent
    # connection (CONN_MAX_AGE, 60 s by default) stays open per thread: ten sites exhaust
    # PostgreSQL's max_connections (100) within a minute. Django's documentation asks for
    # persistent connections to be off under ASGI; so does the server here.
    server_env = {**env, "DATABASE_CONN_MAX_AGE": "0"}
    sup.start(
        "server",
        [python, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "consortium.asgi:application"],
        server_env,
    )
    site_url = url
    if site_api:
        site_port = free_port()
        site_url = f"http://127.0.0.1:{site_port}"
        # As fl-site-api.service: each thread keeps its connection.
        sup.start(
            SITE_API_PROCESS,
            [
                python,
                "-m",
                "gunicorn",
                "consortium.wsgi:application",
                "--bind",
                f"127.0.0.1:{site_port}",
                "--workers",
                "2",
                "--threads",
                "4",
                "--worker-class",
                "gthread",
            ],
            {**env, "DATABASE_CONN_MAX_AGE": "600", "SITE_API_ONLY": "true"},
        )
    sup.start(
        "central-worker",
        celery_worker_argv(
            CENTRAL_QUEUE, hostname="bench-central@%h", beat_schedule=var / "celerybeat-schedule"
        ),
        env,
    )
    # As in production (fl-scoring.service): the rounds never wait for their scores.
    sup.start("scoring-worker", scoring_worker_argv(hostname="bench-scoring@%h"), env)
    return url, site_url


def wait_for_central(sup, urls, deadline: float) -> None:
    """Until the servers answer their health checks and the Celery workers say they are ready."""
    for where in dict.fromkeys(urls):
        wait_for(
            f"the server at {where}", lambda w=where: _http_ok(w + "/health/"), sup, deadline, 0.5
        )
    wait_for(
        "the workers",
        lambda: all(
            " ready." in c.tail(100_000)
            for c in sup.children
            if c.name not in ("server", SITE_API_PROCESS)
        ),
        sup,
        deadline,
        0.5,
    )


def site_environment(site: BenchSite, url: str, var: Path) -> dict:
    """What a site worker for ``site`` is configured with (no central database)."""
    no_db = f"sqlite:///{var / 'no-such-folder' / 'site-workers-have-no-database.sqlite3'}"
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
        "DATABASE_URL": no_db,
        "SITE_SLUG": site.slug,
        "CENTRAL_URL": url,
        "SITE_TOKEN": site.token,
        "SITE_SIGNING_KEY": str(site.key_path),
        "DATA_ROOT": str(site.data_root),
        # Ten sites share this machine's cores (in production each has its own): one
        # thread each, as Ray gives each of Flower's actors, or their idle OpenMP
        # threads spin on the cores the server needs.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }


def start_processes(sup, sites: list[BenchSite], var: Path) -> tuple[str, str]:
    """The central processes and one ``run_site_worker`` process per site; the servers' URLs."""
    url, site_url = start_central(sup, var)
    for site in sites:
        sup.start(
            f"site-{site.slug}",
            [sys.executable, str(ROOT / "manage.py"), "run_site_worker", "--pool", "prefork"],
            site_environment(site, site_url, var),
        )
    return url, site_url


def wait_for(what: str, ready, sup, deadline: float, every: float = 0.2) -> None:
    while time.monotonic() < deadline:
        if ready():
            return
        dead = sup.dead()
        if dead:
            raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].tail()}")
        time.sleep(every)
    logs = "\n".join(f"--- {c.name} ---\n{c.tail(1500)}" for c in sup.children)
    raise RuntimeError(f"timed out waiting for {what}\n{logs}")


def wait_for_quiet_ledger(deadline: float, quiet: float = 1.0) -> None:
    """Wait until nothing has been appended to the ledger for ``quiet`` seconds: the job is
    complete when its last round closes, but the scoring worker scores the rounds'
    contributions (ledger entries) after their commits, and the chain is verified once the
    writers are done."""
    from audit.models import LedgerHead

    last, since = None, time.monotonic()
    while time.monotonic() < deadline:
        seq = LedgerHead.objects.filter(pk=1).values_list("seq", flat=True).first()
        if seq != last:
            last, since = seq, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return
        time.sleep(0.1)


# --- measuring --------------------------------------------------------------------------------


@dataclass
class RoundFigures:
    index: int
    wall: float
    compute: list[float]  # every site's train_seconds
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def critical(self) -> float:
        return max(self.compute)

    @property
    def overhead(self) -> float:
        return self.wall - self.critical


def platform_rounds(job, warmup: int, measured: int) -> list[RoundFigures]:
    """Per measured round, from the rows' timestamps and the sites' reported training time."""
    from training.models import GlobalModel, Round
    from training.site.worker import TRAIN_SECONDS_METRIC

    rounds = {r.index: r for r in Round.objects.filter(job=job)}
    models = {m.round_index: m for m in GlobalModel.objects.filter(job=job)}
    out = []
    for index in range(warmup + 1, warmup + measured + 1):
        rnd, nxt = rounds[index], rounds[index + 1]
        updates = list(rnd.updates.all())
        received = sorted(u.received_at for u in updates)
        compute = [float(u.metrics[TRAIN_SECONDS_METRIC]) for u in updates]
        s = lambda a, b: (b - a).total_seconds()  # noqa: E731
        out.append(
            RoundFigures(
                index=index,
                wall=s(rnd.opened_at, nxt.opened_at),
                compute=compute,
                phases={
                    "open -> first update accepted": s(rnd.opened_at, received[0]),
                    "first -> last update accepted": s(received[0], received[-1]),
                    "last update -> round claimed for closing": s(received[-1], rnd.closed_at),
                    "aggregate + evaluate + store": s(rnd.closed_at, models[index].created_at),
                    "ledger, close, open the next round": s(
                        models[index].created_at, nxt.opened_at
                    ),
                },
            )
        )
    return out


def wait_for_evaluations(job, rounds: range, deadline: float) -> None:
    """Until every measured round's evaluation at the sites has closed (the job completes
    when its last round does; the sites' reports of it may still be on their way)."""
    from training.models import RoundEvaluation

    closed = RoundEvaluation.objects.filter(
        round__job=job, round__index__in=list(rounds), state=RoundEvaluation.State.CLOSED
    )
    while True:
        if closed.count() == len(rounds):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for the sites' evaluations of job #{job.pk}")
        time.sleep(0.5)


def evaluation_phases(job, rounds: range) -> dict[str, list[float]]:
    """The evaluation round-trip of each measured round, from the rows' timestamps: when the
    round's model was stored, when the sites were asked to evaluate it, each site's report
    (asked -> reported), the last report, and the evaluation's close (the scores follow on
    the scoring queue)."""
    from training.models import GlobalModel, RoundEvaluation, SiteEvaluation

    s = lambda a, b: (b - a).total_seconds()  # noqa: E731
    models = {m.round_index: m for m in GlobalModel.objects.filter(job=job)}
    out: dict[str, list[float]] = {}
    for evaluation in RoundEvaluation.objects.filter(
        round__job=job, round__index__in=list(rounds)
    ).select_related("round"):
        reports = list(
            SiteEvaluation.objects.filter(
                evaluation=evaluation, status=SiteEvaluation.Status.REPORTED
            )
        )
        if not reports:
            continue
        last = max(r.reported_at for r in reports)
        stored = models[evaluation.round.index].created_at
        for name, value in (
            ("model stored -> sites asked", s(stored, evaluation.requested_at)),
            ("asked -> last site reported (the round-trip)", s(evaluation.requested_at, last)),
            ("last report -> evaluation closed", s(last, evaluation.closed_at)),
        ):
            out.setdefault(name, []).append(value)
        out.setdefault("one site, asked -> reported", []).extend(
            s(r.sent_at, r.reported_at) for r in reports
        )
        out.setdefault("sites that reported", []).append(len(reports))
    return out


EVALUATION_TASK_RE = re.compile(
    r"Task training\.site_evaluate\[[^\]]+\] succeeded in ([\d.]+)s: (.*)$"
)


def site_evaluation_tasks(sup, rounds: range) -> dict[str, list[float]]:
    """Each site's evaluation task of a measured round, from its worker's log (Celery's
    "succeeded in" line): its own time, queueing excluded, and the models it evaluated."""
    out: dict[str, list[float]] = {}
    for line in site_log_lines(sup):
        match = EVALUATION_TASK_RE.search(line)
        index = match and re.search(r"'round': (\d+)", match[2])
        models = match and re.search(r"'models': (\d+)", match[2])
        if not (match and index and models) or int(index[1]) not in rounds:
            continue
        out.setdefault("one site's evaluation task, its own time", []).append(float(match[1]))
        out.setdefault("models each site evaluated", []).append(int(models[1]))
    return out


def site_log_lines(sup):
    """Every line the site workers logged (each worker's whole log)."""
    for child in sup.children:
        if child.name.startswith("site-"):
            yield from child.tail(10_000_000).splitlines()


def print_evaluation(phases: dict[str, list[float]]) -> None:
    if not phases:
        print("    evaluation at the sites: no measured round was evaluated")
        return
    print("    evaluation at the sites (median over measured rounds; one site: over every report):")
    for name, values in phases.items():
        unit = "" if name in ("sites that reported", "models each site evaluated") else " s"
        print(f"      {name:<44} {statistics.median(values):8.4f}{unit}")


def site_phases(sup, job_id: int, rounds: range) -> dict[str, list[float]]:
    """The phase timings the site workers log for each task (``training.site.worker``)."""
    phases: dict[str, list[float]] = {}
    for line in site_log_lines(sup):
        match = PHASES_RE.search(line)
        if not match or int(match[1]) != job_id or int(match[2]) not in rounds:
            continue
        for item in match[3].split():
            name, _, value = item.partition("=")
            phases.setdefault(name, []).append(float(value))
    return phases


def run_platform(args, var: Path) -> tuple[list[RoundFigures], dict, dict]:
    from training.demo.processes import Supervisor
    from training.models import TERMINAL_STATES, JobState
    from training.queues import CENTRAL_QUEUE, SCORING_QUEUE, site_queue

    total_rounds = args.warmup + args.rounds + 1  # +1: the last measured round ends when it opens
    admin, consortium, sites = seed_consortium(args.sites, var)
    purge_queues([CENTRAL_QUEUE, SCORING_QUEUE, *[site_queue(s.slug) for s in sites]])
    log_dir = var / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    sup = Supervisor(log_dir)
    deadline = time.monotonic() + args.timeout
    try:
        started = time.monotonic()
        wait_for_central(sup, start_processes(sup, sites, var), deadline)
        print(f"  {len(sup.children)} processes up in {time.monotonic() - started:.1f} s")
        job = propose_and_approve(admin, consortium, sites, total_rounds, args.evaluation)
        started = time.monotonic()
        while True:
            job.refresh_from_db()
            if job.state in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: job #{job.pk} is {job.state}")
            dead = sup.dead()
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].tail()}")
            time.sleep(0.5)
        if job.state != JobState.COMPLETED:
            logs = "\n".join(f"--- {c.name} ---\n{c.tail(1500)}" for c in sup.children)
            raise RuntimeError(f"job #{job.pk} {job.state}: {job.end_reason}\n{logs}")
        print(f"  {total_rounds} rounds in {time.monotonic() - started:.1f} s")
        measured = range(args.warmup + 1, args.warmup + args.rounds + 1)
        evaluation = {}
        if args.evaluation == "sites":
            wait_for_evaluations(job, measured, deadline)
            evaluation = evaluation_phases(job, measured)
            evaluation.update(site_evaluation_tasks(sup, measured))

        wait_for_quiet_ledger(deadline)
        figures = platform_rounds(job, args.warmup, args.rounds)
        phases = site_phases(sup, job.pk, measured)
        print_peak_memory(sup)
        from audit.ledger.chain import verify_chain

        result = verify_chain()
        if not result.ok:
            raise RuntimeError(f"the ledger does not verify: {result.summary()}")
        return figures, phases, evaluation
    finally:
        sup.stop_all()


def _peak_rss_mib(pid: int) -> float | None:
    """The process's peak resident memory (``VmHWM``), or None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _children_of(pid: int) -> list[int]:
    try:
        tasks = Path(f"/proc/{pid}/task").iterdir()
        return [int(c) for t in tasks for c in (t / "children").read_text().split()]
    except OSError:
        return []


def print_peak_memory(sup) -> None:
    """Each kind of process's peak resident memory over the run (Linux ``VmHWM``): the worker's
    main process, and the largest of its children (a site worker's pool child, which imports
    torch and trains; the coordinator's beat and pool). Resident memory counts pages a forked
    child shares with its parent in both, so the sum overstates what a machine needs a little."""
    if not Path("/proc/self/status").exists():
        return
    kinds: dict[str, list[tuple[float, float]]] = {}
    for child in sup.children:
        main = _peak_rss_mib(child.proc.pid)
        if main is None:
            continue
        peaks = [p for p in map(_peak_rss_mib, _children_of(child.proc.pid)) if p is not None]
        kind = "site worker" if child.name.startswith("site-") else child.name
        kinds.setdefault(kind, []).append((main, max(peaks, default=0.0)))
    print("  peak resident memory (VmHWM), main process / its largest child:")
    for kind, figures in kinds.items():
        mains, children = [m for m, _ in figures], [c for _, c in figures]
        many = f" (the largest of {len(figures)})" if len(figures) > 1 else ""
        print(f"    {kind:<16} {max(mains):6.0f} MiB / {max(children):6.0f} MiB{many}")


# --- Flower: the same workload in its simulation and in its deployment runtime ----------------
#
# Both Flower runs train with these functions (the deployment runtime's app imports them from
# this module: benchmarks/flower_deployment/), so the workload cannot drift between them.


def flower_model():
    """A fresh, untrained model of the workload, built by the platform's own registry."""
    from training.fl.models import build_model
    from training.jobs.registry import model_registry

    return build_model(
        model_registry()[MODEL["name"]].class_path,
        input_shape=[30],
        n_classes=2,
        params=MODEL["params"],
    )


def flower_initial_state() -> dict:
    """The global weights every Flower run starts from (``torch.manual_seed(0)``, then the
    model): the same in the simulation and in the deployment runtime."""
    import torch

    torch.manual_seed(0)
    return flower_model().state_dict()


def flower_site_training(
    weights: dict | list, slugs: list[str], slug: str, server_round: int
) -> tuple[dict, int, float]:
    """One site's part of a Flower round: the platform's ``train_local`` on the site's share of
    ``demo_split``, with the job's LOCAL settings, from the global weights: tensors by name
    (a state dict, as the deployment runtime's messages carry them) or in the state dict's
    order (a list, as the simulation's parameters come).

    Returns the trained weights (a state dict), the samples seen (FedAvg's weight) and the
    seconds ``train_local`` took: the site's local compute, measured as the platform's site
    workers measure theirs (``train_seconds``), loading the data and the weights left out."""
    from training.fl.data import demo_split
    from training.fl.local import train_local

    data = demo_split(DATASET, slugs)[slug]
    model = flower_model()
    if not isinstance(weights, dict):
        weights = dict(zip(model.state_dict(), weights, strict=True))
    model.load_state_dict(weights)
    started = time.perf_counter()
    result = train_local(
        model,
        data,
        epochs=LOCAL["local_epochs"],
        batch_size=LOCAL["batch_size"],
        optimizer=LOCAL["optimizer"],
        momentum_restart=True,
        seed=server_round * 1000 + slugs.index(slug),
        device="cpu",
    )
    seconds = time.perf_counter() - started
    return model.state_dict(), result.samples, seconds  # trained in place: start + delta


@functools.cache
def _validation_set():
    from training.fl.data import load_validation_set

    return load_validation_set(DATASET)


def flower_central_evaluation(state: dict) -> dict[str, float]:
    """The global weights' loss and accuracy on the validation set, evaluated as the platform
    evaluates each round's aggregate (``training.fl.evaluate``)."""
    from training.fl.evaluate import evaluate

    model = flower_model()
    model.load_state_dict(state)
    x_val, y_val = _validation_set()
    return evaluate(model, x_val, y_val, modality="tabular")


def flower_round_figures(
    opened: dict[int, float], compute: dict[int, list[float]], args
) -> list[RoundFigures]:
    """The measured rounds of a Flower run from when each round opened (its training was
    configured) and the sites' ``train_seconds``: round ``r``'s wall time runs to round
    ``r + 1``'s opening, which is why every Flower run has one round more than it measures."""
    return [
        RoundFigures(index=index, wall=opened[index + 1] - opened[index], compute=compute[index])
        for index in range(args.warmup + 1, args.warmup + args.rounds + 1)
    ]


def _flower_client_fn(context):
    """A Flower client for one site in the simulation (``flower_site_training``)."""
    import numpy as np
    import torch
    from flwr.client import NumPyClient

    slugs = site_slugs(int(os.environ["BENCH_SITES"]))
    slug = slugs[int(context.node_config["partition-id"])]

    class Client(NumPyClient):
        def fit(self, parameters, config):
            trained, samples, seconds = flower_site_training(
                [torch.from_numpy(np.asarray(p)) for p in parameters],
                slugs,
                slug,
                int(config.get("server_round", 0)),
            )
            return (
                [t.detach().cpu().numpy() for t in trained.values()],
                samples,
                {"train_seconds": seconds},
            )

    return Client().to_client()


def _flower_importable() -> bool:
    try:
        import flwr  # noqa: F401
    except ImportError:
        return False
    return True


def run_flower(args) -> list[RoundFigures]:
    """The same workload in Flower's (Ray-based) simulation: same model and initial weights,
    same data split, same local training, FedAvg weighted by samples, central evaluation on the
    validation set after each round."""
    import logging

    import flwr
    import torch
    from flwr.common import ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.simulation import start_simulation

    logging.getLogger("flwr").setLevel(logging.WARNING)
    os.environ["BENCH_SITES"] = str(args.sites)
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    total_rounds = args.warmup + args.rounds + 1

    initial = flower_initial_state()
    names = list(initial)
    _validation_set()  # loaded before the rounds, not in the first one

    def evaluate_fn(server_round, parameters, config):
        metrics = flower_central_evaluation(
            {n: torch.from_numpy(p) for n, p in zip(names, parameters, strict=True)}
        )
        return float(metrics.get("loss", 0.0)), {"accuracy": metrics.get("accuracy")}

    opened: dict[int, float] = {}
    compute: dict[int, list[float]] = {}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            opened[server_round] = time.perf_counter()
            return super().configure_fit(server_round, parameters, client_manager)

        def aggregate_fit(self, server_round, results, failures):
            if failures:
                raise RuntimeError(f"Flower round {server_round}: {failures}")
            compute[server_round] = [float(r.metrics["train_seconds"]) for _c, r in results]
            return super().aggregate_fit(server_round, results, failures)

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=args.sites,
        min_available_clients=args.sites,
        min_evaluate_clients=0,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"server_round": r},
        initial_parameters=ndarrays_to_parameters([t.detach().numpy() for t in initial.values()]),
    )
    actors = args.flower_actors or os.cpu_count() or 1
    start_simulation(
        client_fn=_flower_client_fn,
        num_clients=args.sites,
        config=ServerConfig(num_rounds=total_rounds),
        strategy=strategy,
        # Ray schedules a client per CPU it is told of: "actors" at once.
        client_resources={"num_cpus": 1, "num_gpus": 0.0},
        ray_init_args={
            "num_cpus": actors,
            "include_dashboard": False,
            "log_to_driver": False,
            "object_store_memory": 100 * 1024 * 1024,
            "runtime_env": {
                "env_vars": {"PYTHONPATH": os.environ["PYTHONPATH"], "BENCH_SITES": str(args.sites)}
            },
        },
    )
    print(f"  flwr {flwr.__version__}, {actors} Ray actors")
    return flower_round_figures(opened, compute, args)


# The deployment runtime: a SuperLink, one SuperNode per site, ``flwr run`` -------------------

FLOWER_APP = ROOT / "benchmarks" / "flower_deployment"
#: The executables the deployment runtime needs: the two servers, the CLI that submits the app,
#: and what the SuperLink and the SuperNodes start per run (they look these up on their PATH).
FLOWER_EXECUTABLES = (
    "flower-superlink",
    "flower-supernode",
    "flwr",
    "flower-superexec",
    "flwr-serverapp",
    "flwr-clientapp",
)
#: Set in the environment of every process the deployment run starts. Flower's servers start
#: their SuperExec in a session of its own (out of reach of the process group that stopping
#: them kills), and that starts the ServerApp and ClientApp processes; they all inherit the
#: environment, so this finds whatever is left of them at the end.
FLOWER_RUN_TAG = "FLC_BENCH_FLOWER_RUN"
#: The name of the SuperLink connection ``flwr run`` is given (in the run's own FLWR_HOME).
FLOWER_CONNECTION = "bench-local"


def flower_bin_dir() -> Path | None:
    """Where Flower's executables are: beside this interpreter (its virtualenv's ``bin``, so
    running the benchmark with a venv's Python is enough) or else on the PATH; None when one
    is missing."""
    for folder in (Path(sys.executable).parent, *map(Path, os.get_exec_path())):
        if all(os.access(folder / name, os.X_OK) for name in FLOWER_EXECUTABLES):
            return folder
    return None


def _tagged_processes(tag: str) -> list[int]:
    """The processes whose environment carries ``FLOWER_RUN_TAG=tag`` (Linux ``/proc``)."""
    marker = f"{FLOWER_RUN_TAG}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone, or not ours
            continue
        if marker in environ.split(b"\0"):
            pids.append(int(entry.name))
    return pids


def stop_tagged_processes(tag: str, grace: float = 5.0) -> list[str]:
    """Stop every process left with the run's tag: SIGTERM, then SIGKILL after ``grace``
    seconds. Returns the ones it found, as ``name[pid]``."""
    import signal

    found = _tagged_processes(tag)
    names = []
    for pid in found:
        with contextlib.suppress(OSError):
            names.append(f"{Path(f'/proc/{pid}/comm').read_text().strip()}[{pid}]")
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while _tagged_processes(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in _tagged_processes(tag):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return names


def _distinct_free_ports(count: int) -> list[int]:
    from training.demo.processes import free_port

    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def _listening(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _flower_environment(bin_dir: Path, tag: str, flwr_home: Path) -> dict:
    """The environment of a Flower process of the run: the workload importable (the project
    and ``round_overhead``), Flower's executables first on the PATH, its own ``FLWR_HOME``
    (each server keeps its app installs there, as on its own machine), no telemetry or update
    check (nothing outside this machine is reachable), and the run's tag."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    return {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")]),
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT), str(ROOT / "benchmarks"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
        "PYTHONUNBUFFERED": "1",
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        FLOWER_RUN_TAG: tag,
    }


def run_flower_deployment(args) -> list[RoundFigures]:
    """The same workload in Flower's deployment runtime, as a consortium would run Flower: a
    SuperLink and one SuperNode per site as processes of their own (insecure, on 127.0.0.1),
    the app under ``benchmarks/flower_deployment`` submitted with ``flwr run``, and the
    ServerApp and ClientApps started by Flower's runtime (subprocess isolation). The ServerApp
    times the rounds as ``run_flower`` does and writes the figures to a file of the run.

    Every process started here is stopped before it returns, failed or not: the servers by
    their process groups, and whatever their SuperExecs started by ``FLOWER_RUN_TAG``."""
    import json
    import subprocess
    import uuid

    import django
    from django.apps import apps

    # The Supervisor (training.demo, which imports the models) runs its children in
    # settings.BASE_DIR; with --flower-only nothing has set Django up yet.
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
    if not apps.ready:
        django.setup()
    from training.demo.processes import Supervisor

    bin_dir = flower_bin_dir()
    if bin_dir is None:
        raise RuntimeError(f"Flower's executables are missing: {', '.join(FLOWER_EXECUTABLES)}")
    link_port, *node_ports = _distinct_free_ports(args.sites + 1)
    total_rounds = args.warmup + args.rounds + 1
    tag = uuid.uuid4().hex
    work = Path(tempfile.mkdtemp(prefix="flc_bench_flower_"))  # logs, FLWR_HOMEs, figures
    (work / "logs").mkdir()
    figures_path = work / "figures.json"
    sup = Supervisor(work / "logs")
    deadline = time.monotonic() + args.timeout
    try:
        started = time.monotonic()
        sup.start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--host",
                "127.0.0.1",
                "--port",
                str(link_port),
                # The app runs in this environment: nothing to install (and no index to reach).
                "--disable-runtime-dependency-installation",
            ],
            _flower_environment(bin_dir, tag, work / "flwr-home" / "superlink"),
        )
        wait_for("the SuperLink", lambda: _listening(link_port), sup, deadline, 0.2)
        slugs = site_slugs(args.sites)
        for number, (slug, port) in enumerate(zip(slugs, node_ports, strict=True)):
            env = {
                **_flower_environment(bin_dir, tag, work / "flwr-home" / slug),
                # As the platform's site workers and Ray's actors: one thread per site.
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
            }
            sup.start(
                f"supernode-{slug}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{link_port}",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--node-config",
                    f"partition-id={number} num-partitions={args.sites}",
                ],
                env,
            )
        wait_for(
            "the SuperNodes",
            lambda: all(_listening(port) for port in node_ports),
            sup,
            deadline,
            0.5,
        )
        print(f"  {len(sup.children)} processes up in {time.monotonic() - started:.1f} s")

        cli_home = work / "flwr-home" / "cli"
        cli_env = _flower_environment(bin_dir, tag, cli_home)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{FLOWER_CONNECTION}"\n\n'
            f'[superlink.{FLOWER_CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
        )
        run_config = (
            f"num-server-rounds={total_rounds} num-sites={args.sites} "
            f"round-timeout={float(args.timeout)} figures-path='{figures_path}'"
        )
        submitted = subprocess.run(
            [
                str(bin_dir / "flwr"),
                "run",
                str(FLOWER_APP),
                FLOWER_CONNECTION,
                "--run-config",
                run_config,
                "--format",
                "json",
            ],
            env=cli_env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=max(1.0, deadline - time.monotonic()),
            check=False,
        )
        if submitted.returncode != 0:
            raise RuntimeError(f"flwr run failed:\n{submitted.stdout}\n{submitted.stderr}")
        started = time.monotonic()
        wait_for("the Flower run", figures_path.exists, sup, deadline, 0.5)
        figures = json.loads(figures_path.read_text())
        if figures["error"]:
            logs = "\n".join(f"--- {c.name} ---\n{c.tail(3000)}" for c in sup.children)
            raise RuntimeError(f"the Flower run failed:\n{figures['error']}\n{logs}")
        print(f"  {total_rounds} rounds in {time.monotonic() - started:.1f} s")
        print(
            f"  flwr {figures['flwr']}: a SuperLink and {args.sites} SuperNodes, "
            f"ServerApp and ClientApps in subprocesses"
        )
        # The simulation's actors and the platform's site workers train warm after the warm-up
        # rounds; here no round is warm, and its first-call cost counts as local compute.
        print(
            "  each round's ClientApps are new processes: their train_seconds include "
            "train_local's first call in a process (imports, lazy initialisation)"
        )
        return flower_round_figures(
            {int(r): t for r, t in figures["opened"].items()},
            {int(r): s for r, s in figures["train_seconds"].items()},
            args,
        )
    finally:
        sup.stop_all()
        left = stop_tagged_processes(tag)
        if left:
            print(f"  stopped what the servers left running: {', '.join(left)}")
        if args.keep:
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


# --- the report ------------------------------------------------------------------------------


def describe(rounds: list[RoundFigures]) -> dict:
    wall = [r.wall for r in rounds]
    over = [r.overhead for r in rounds]
    crit = [r.critical for r in rounds]
    return {
        "wall_median": statistics.median(wall),
        "critical_median": statistics.median(crit),
        "compute_sum_median": statistics.median(sum(r.compute) for r in rounds),
        "overhead_median": statistics.median(over),
        "overhead_mean": statistics.fmean(over),
        "overhead_min": min(over),
        "overhead_max": max(over),
    }


def print_figures(title: str, rounds: list[RoundFigures]) -> dict:
    d = describe(rounds)
    print(f"{title}: {len(rounds)} measured rounds")
    print(
        f"    wall per round (median):             {d['wall_median']:8.4f} s\n"
        f"    local compute, critical path (median): {d['critical_median']:6.4f} s   "
        f"(all sites summed: {d['compute_sum_median']:.4f} s)\n"
        f"    overhead = wall - critical path:     {d['overhead_median']:8.4f} s median, "
        f"{d['overhead_mean']:.4f} mean, {d['overhead_min']:.4f} to {d['overhead_max']:.4f}"
    )
    print("    per round overhead: " + ", ".join(f"r{r.index} {r.overhead:.3f}" for r in rounds))
    return d


def print_breakdown(rounds: list[RoundFigures], phases: dict[str, list[float]]) -> None:
    print("    where the wall time goes (median over rounds):")
    for name in rounds[0].phases:
        print(f"      {name:<44} {statistics.median(r.phases[name] for r in rounds):8.4f} s")
    if phases:
        print("    site task phases (median over every site and round, seconds):")
        print(
            "      "
            + "  ".join(
                f"{name} {statistics.median(values):.4f}" for name, values in phases.items()
            )
        )


def main() -> int:
    args = parse_args()
    var = Path(tempfile.mkdtemp(prefix="flc_bench_rounds_"))
    where = broker = "n/a"
    cleanup = None
    try:
        print(
            f"round overhead benchmark, {dt.date.today()} on {platform.node()}: "
            f"{os.cpu_count()} cores, Python {platform.python_version()}"
        )
        print(
            f"workload: {args.sites} sites, {MODEL['name']} on {DATASET}, "
            f"{LOCAL['local_epochs']} local epoch, batch {LOCAL['batch_size']}; "
            f"{args.rounds} measured rounds after {args.warmup} warm-up rounds"
        )
        ours = None
        flower_installed = not args.no_flower and _flower_importable()
        simulation_before = None  # describe() of Flower's simulation run before the platform
        if flower_installed and not args.flower_only:
            # The anchor on both sides of the platform's run: what a run leaves behind (its
            # database's clean-up, its processes' exit) slows whatever comes right after it.
            print("Flower's simulation of the same workload, before the platform:")
            simulation_before = print_figures("Flower (simulation, before)", run_flower(args))
        if not args.flower_only:
            where, cleanup = prepare_database(var)
            broker = prepare_environment(var)
            setup_django()
            print(f"database: {where}; broker: {broker}")
            print("the platform (server, coordinator, site workers as processes):")
            ours, phases, evaluation = run_platform(args, var)
            d_ours = print_figures("the platform", ours)
            print_breakdown(ours, phases)
            if args.evaluation == "sites":
                print_evaluation(evaluation)

        simulation = deployment = None  # describe() of each Flower run
        if not args.no_flower:
            if not flower_installed:
                print("Flower: not installed (pip install -e '.[bench]'); skipped")
            else:
                if simulation_before is not None:
                    print("Flower's simulation of the same workload, after the platform:")
                    name = "Flower (simulation, after)"
                else:
                    print("Flower's simulation of the same workload:")
                    name = "Flower (simulation)"
                simulation = print_figures(name, run_flower(args))
                if args.no_flower_deployment:
                    pass
                elif flower_bin_dir() is None:
                    print(
                        "Flower's deployment runtime: its executables "
                        f"({', '.join(FLOWER_EXECUTABLES)}) are neither beside "
                        f"{sys.executable} nor on the PATH; skipped"
                    )
                else:
                    print("Flower's deployment runtime (SuperLink and SuperNodes as processes):")
                    deployment = print_figures(
                        "Flower (deployment runtime)", run_flower_deployment(args)
                    )

        def print_ratio(numerator: str, d_num: dict, denominator: str, d_den: dict) -> None:
            over, under = d_num["overhead_median"], d_den["overhead_median"]
            print(
                f"ratio of median overheads, {numerator} / {denominator}: {over / under:.2f} "
                f"({over:.4f} s / {under:.4f} s)"
            )

        if ours and simulation and simulation_before:
            print_ratio("platform", d_ours, "Flower simulation before it", simulation_before)
            print_ratio("platform", d_ours, "Flower simulation after it", simulation)
            # The conservative figure: against the faster of the two anchors.
            faster = min(simulation_before, simulation, key=lambda d: d["overhead_median"])
            print_ratio("platform", d_ours, "Flower simulation (the faster run)", faster)
        elif ours and simulation:
            print_ratio("platform", d_ours, "Flower simulation", simulation)
        if ours and deployment:
            print_ratio("platform", d_ours, "Flower deployment runtime", deployment)
        if simulation and deployment:
            print_ratio("Flower deployment runtime", deployment, "Flower simulation", simulation)
    finally:
        if cleanup is not None:
            cleanup()
        if args.keep:
            print(f"kept {var}")
        else:
            shutil.rmtree(var, ignore_errors=True)
    return 0


def stop_like_ctrl_c(signum, frame) -> None:
    """Ctrl-C or SIGTERM (``kill``, ``timeout``): stop, so that the ``finally`` blocks stop the
    processes started (and drop the database) instead of leaving them running; a second signal
    (a second Ctrl-C, or the other of the two) is ignored, so it cannot cut that clean-up short.
    ``round_scale.py`` installs it too."""
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, signal.SIG_IGN)
    raise KeyboardInterrupt


if __name__ == "__main__":
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, stop_like_ctrl_c)
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
