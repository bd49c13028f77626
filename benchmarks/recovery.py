#!/usr/bin/env python
"""Recovery benchmark: how long each fault of issue 13 holds a job up.

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres \\
        .venv/bin/python benchmarks/recovery.py [--baselines 3] [--only NAME ...] [--keep]
    .venv/bin/python benchmarks/recovery.py       # the embedded default: SQLite, filesystem broker

The fault suite's cluster (tests/support/fault_cluster.py) runs for real: the central web
server (Daphne), the coordinator (``celery -A consortium worker -Q central``), the scoring
worker (``-Q scoring``), Celery beat
(``rounds_tick`` every 10 s, production's interval) and three ``manage.py run_site_worker``
processes, on PostgreSQL and a throwaway ``redis-server`` of the run's own, or (without a
PostgreSQL ``DATABASE_URL``) on the embedded default: a SQLite file and a filesystem broker in the
run's folder, where the three scenarios that terminate PostgreSQL connections or kill the broker
process do not apply and are left out, saying so. Each scenario of the
fault suite (tests/faults/scenarios.py) runs one job (3 sites, 3 rounds of logistic regression
on the breast-cancer set; the site gone for good: 2 rounds, 20 s round timeout, 2 of 3 sites
required) through one fault, and the benchmark prints

* recovery: the seconds from the repair (the process or broker started again; for a fault
  nothing repairs, the fault itself) to the job moving on (a round opened or closed, an update
  accepted; for the broker, an update of the next round, which went through the new broker),
  and that as a multiple of the tick interval;
* the extra wall time the fault cost the job: its wall time less the median of fault-free jobs
  of the same shape measured in the same run (``--baselines`` of them, spread over the run:
  machines are noisy), and the ratio of the two.

The cluster runs with ``FL_CLAIM_LEASE_SECONDS=10`` and ``FL_REDISPATCH_AFTER_SECONDS=15``
(tests/support/fault_cluster.py); production's defaults are 30 s and 300 s.

On PostgreSQL (``DATABASE_URL``) the run creates and drops ``flc_bench_recovery`` on that
server and needs ``redis-server``; either way it needs the dev extras (the consortium is built
with the tests' helpers). Logs go to a temporary folder (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
BENCH_DB = "flc_bench_recovery"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--baselines", type=int, default=3, help="fault-free jobs of each shape (default 3)"
    )
    parser.add_argument("--only", nargs="*", default=None, help="scenario names to run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    return parser.parse_args()


def prepare(var: Path):
    import ledger as bench_ledger

    for name in ("CELERY_BROKER_URL", "CHANNEL_LAYER_URL"):
        os.environ.pop(name, None)  # the cluster's broker is its own
    bench_ledger.BENCH_DB = BENCH_DB
    where, cleanup = bench_ledger.prepare_database(var)
    os.environ["DJANGO_SETTINGS_MODULE"] = "consortium.settings"
    os.environ["DJANGO_DEBUG"] = "false"
    os.environ["ARTIFACT_ROOT"] = str(var / "artifacts")
    os.environ["EMAIL_URL"] = "dummymail://"
    import logging

    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)
    return where, cleanup


def run(args, var: Path) -> None:
    from tests.faults import scenarios
    from tests.support.fault_cluster import (
        LEASE_SECONDS,
        REDISPATCH_SECONDS,
        TICK_SECONDS,
        build_cast,
        point_this_process_at,
        start_cluster,
    )
    from tests.support.filesystem_broker import FilesystemBroker
    from tests.support.fl_harness import make_consortium3
    from tests.support.redis_server import RedisServer

    database_url = os.environ["DATABASE_URL"]
    broker = (
        FilesystemBroker(var / "broker")
        if database_url.startswith("sqlite:")
        else RedisServer(var / "redis")
    )
    broker.start()
    undo = point_this_process_at(broker)
    c3 = make_consortium3(build_cast(), var)
    started = time.monotonic()
    cluster = start_cluster(var, c3, broker, database_url=database_url)
    print(
        f"cluster up in {time.monotonic() - started:.1f} s: web server, coordinator, scoring "
        "worker, beat, "
        f"{len(c3.sites)} site workers; tick {TICK_SECONDS:.0f} s, claim lease "
        f"{LEASE_SECONDS} s, re-dispatch after {REDISPATCH_SECONDS} s; broker: {broker.kind}"
    )
    names = args.only or list(scenarios.SCENARIOS)
    unknown = set(names) - set(scenarios.SCENARIOS)
    if unknown:
        raise SystemExit(
            f"unknown scenarios: {sorted(unknown)}; known: {list(scenarios.SCENARIOS)}"
        )
    for name in list(names):
        reason = scenarios.not_applicable(cluster, name)
        if reason is not None:
            print(f"{name}: left out: {reason}")
            names.remove(name)
    baselines: dict[str, list[float]] = {"default": [], "site-gone": []}

    def baseline(shape: str):
        job_started = time.monotonic()
        overrides = scenarios.SITE_GONE_SHAPE if shape == "site-gone" else {}
        job = scenarios.start_job(cluster, **overrides)
        scenarios.wait_ended(cluster, job)
        baselines[shape].append(time.monotonic() - job_started)

    try:
        scenarios.fault_free(cluster)  # warm-up: caches, first imports in the pool processes
        slots = {0, len(names) // 2, len(names)} if args.baselines >= 3 else {0}
        extra = max(0, args.baselines - len(slots))
        outcomes = []
        for i, name in enumerate([*names, None]):
            if i in slots:
                baseline("default")
                if "site-gone-for-good" in names:
                    baseline("site-gone")
            if name is None:
                break
            try:
                outcome = scenarios.SCENARIOS[name](cluster)
            except AssertionError as exc:  # timed out: say so, go on with the next fault
                print(f"{name}: did not recover: {str(exc).splitlines()[0]}")
                for proc in cluster.dead():
                    cluster.start(proc)
                continue
            if outcome.job.state != "completed":
                print(
                    f"{name}: job #{outcome.job.pk} {outcome.job.state}: {outcome.job.end_reason}"
                )
            outcomes.append((name, outcome))
            assert not cluster.dead(), f"processes died: {cluster.dead()}\n{cluster.tails()}"
        for _ in range(extra):
            baseline("default")
        print_figures(outcomes, baselines, TICK_SECONDS)
    finally:
        cluster.stop()
        undo()


def print_figures(outcomes, baselines, tick: float) -> None:
    base = {k: statistics.median(v) for k, v in baselines.items() if v}
    print()
    for shape, values in baselines.items():
        if values:
            print(
                f"fault-free job ({shape} shape): median {base[shape]:.1f} s over "
                f"{len(values)} runs ({', '.join(f'{v:.1f}' for v in values)})"
            )
    print()
    header = (
        f"{'fault':<52} {'recovery':>9} {'x tick':>7} {'job wall':>9} {'extra':>7} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for name, outcome in outcomes:
        shape = "site-gone" if name == "site-gone-for-good" else "default"
        wall, ref = outcome.wall, base[shape]
        recovery = (
            f"{outcome.recovery:8.1f}s {outcome.recovery / tick:7.2f}"
            if outcome.recovery is not None
            else f"{'n/a':>9} {'':>7}"
        )
        print(f"{outcome.name:<52} {recovery} {wall:8.1f}s {wall - ref:+6.1f}s {wall / ref:6.2f}")


def main() -> int:
    args = parse_args()
    var = Path(tempfile.mkdtemp(prefix="flc_bench_recovery_"))
    cleanup = None
    try:
        print(
            f"recovery benchmark, {dt.date.today()} on {platform.node()}: "
            f"{os.cpu_count()} cores, Python {platform.python_version()}"
        )
        where, cleanup = prepare(var)
        print(f"database: {where}")
        run(args, var)
    finally:
        if cleanup is not None:
            cleanup()
        if args.keep:
            print(f"kept {var}")
        else:
            shutil.rmtree(var, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
