#!/usr/bin/env python
"""Scale benchmark: what a round costs the centre per site, at 10, 100 and 1,000 sites.

    .venv/bin/python benchmarks/round_scale.py [--sites 10,100,1000] [--rounds 2] [--warmup 1]
                                               [--drivers 3] [--threads 8]

The centre is real and run as an operator runs it (``round_overhead.start_central``): the server
(Daphne), the coordinator (a Celery worker with beat on ``central``), the scoring worker, the
broker and the database the environment names. The sites are played by a few driver processes
(``site_driver.py``): each runs the real site task, :func:`training.site.worker.run_site_round`,
for its share of the sites, over HTTP with each site's own token and Ed25519 key (ledger
witnessed and cosigned, model fetched and checked, local training on the site's CSV, update
signed and uploaded), and sends each site's heartbeat every 30 s. Each site holds one of ten
shares of the breast-cancer set, so a site's own work is the same at every scale.

Each number of sites runs in a process of its own, on a fresh database, and reports per
measured round (the first ``--warmup`` rounds are left out):

* wall: from the round's opening to the next round's opening;
* the CPU time each central process spent in the measured rounds, per site and round: the
  server, the coordinator, the scoring worker, and, when they run on this machine, the
  database (PostgreSQL's processes) and the broker (``redis-server``), read from ``/proc``;
* the drivers' CPU per site and round (the sites' side: on a real consortium each site pays
  its own, on its own machine);
* the coordinator's and the server's peak resident memory;
* how many ledger checkpoints were signed per round (``LEDGER_CHECKPOINT_SECONDS``).

After the job, the floor a round's central cost is measured against, in the same run: the
centre's CPU for an authenticated site request that does nothing (``GET whoami/``, the site's
own token, a new connection each, as the worker makes them), ``--floor`` of them spread over
the sites, from a few threads. A training task makes two requests a round (the model, the
update), so twice that is what any round costs the centre per site before it does any work;
the report prints the round's central CPU per site as a multiple of it.

Then the per-site marginal cost of a round between consecutive sizes: how much longer a round
took per site added. On a machine of two cores the drivers' CPU shares the cores with the
centre, so the wall figures include the sites' work; the central CPU per site is the figure
that does not depend on where the sites run.

Needs a real broker (``CELERY_BROKER_URL``, e.g. ``redis://127.0.0.1:6379/2``; its queues are
purged): the embedded filesystem broker polls a folder per queue, which a thousand queues do not
suit. On PostgreSQL (``DATABASE_URL``) it creates and drops ``flc_bench_scale``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import round_overhead as ro  # noqa: E402

BENCH_DB = "flc_bench_scale"
#: Each site holds one of this many shares of the data set (``seed_consortium``).
SHARES = 10
RESULT_PREFIX = "RESULT "
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sites", default="10,100,1000", help="numbers of sites, comma-separated (10,100,1000)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds left out (default 1)")
    parser.add_argument("--drivers", type=int, default=3, help="driver processes (default 3)")
    parser.add_argument(
        "--threads", type=int, default=8, help="site tasks at once per driver (default 8)"
    )
    parser.add_argument(
        "--site-api",
        choices=["asgi", "wsgi"],
        default="wsgi",
        help="what serves the sites: the site API's own WSGI server, as docs/deploy runs it "
        "(wsgi, the default), or Daphne, which serves the pages (asgi: the layout before)",
    )
    parser.add_argument(
        "--idle",
        type=float,
        default=60.0,
        help="seconds the heartbeats alone are measured before the job (default 60; 0: not "
        "measured)",
    )
    parser.add_argument(
        "--floor",
        type=int,
        default=1000,
        help="authenticated empty requests for the floor, spread over the sites (default 1000; "
        "0: not measured)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per size")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folders (logs)")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # one size, in this process
    return parser.parse_args()


# --- CPU and memory of processes, from /proc ----------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # after "pid (comm) "


def cpu_seconds(pid: int) -> float:
    """CPU time of ``pid``, its live descendants and the children it has reaped (a Celery
    worker's pool, PostgreSQL's backends), in seconds; 0 once it is gone."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    # utime, stime, cutime, cstime: fields 14-17 of stat, 11-14 after the comm.
    ticks = sum(int(v) for v in fields[11:15])
    return ticks / CLOCK_TICKS + sum(cpu_seconds(c) for c in ro._children_of(pid))


def _pids_named(name: str) -> list[int]:
    """This machine's processes called ``name`` whose parent is not (the top of a tree)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            comm = (entry / "comm").read_text().strip()
            if comm == name:
                fields = _stat_fields(int(entry.name))
                if fields:
                    found[int(entry.name)] = int(fields[1])  # ppid
    return [pid for pid, parent in found.items() if parent not in found]


def central_processes(sup) -> dict[str, list[int]]:
    """The centre's processes by role: the benchmark's own children, and the database and
    broker servers when they run on this machine."""
    roles = {c.name: [c.proc.pid] for c in sup.children if not c.name.startswith("site-")}
    if os.environ.get("DATABASE_URL", "").startswith(("postgres", "pgsql")):
        roles["database (PostgreSQL)"] = _pids_named("postgres")
    broker = urlsplit(os.environ.get("CELERY_BROKER_URL", ""))
    if broker.scheme == "redis":  # the one on the broker's port (tests start others)
        port = f":{broker.port or 6379}"
        roles["broker (redis-server)"] = [
            pid
            for pid in _pids_named("redis-server")
            if port in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        ]
    roles["site drivers"] = [c.proc.pid for c in sup.children if c.name.startswith("site-")]
    return {role: pids for role, pids in roles.items() if pids}


def cpu_snapshot(roles: dict[str, list[int]]) -> dict[str, float]:
    return {role: sum(cpu_seconds(p) for p in pids) for role, pids in roles.items()}


# --- one size ---------------------------------------------------------------------------------


@dataclass
class SizeResult:
    sites: int
    seed_seconds: float
    wall_per_round: list[float]
    cpu_ms_per_site_round: dict[str, float]
    coordinator_peak_mib: tuple[float, float]
    server_peak_mib: float
    site_api_peak_mib: float
    site_phases: dict[str, float]
    idle_ms_per_site_second: dict[str, float]
    floor_ms_per_request: dict[str, float]
    checkpoints_per_round: float


def _whoami(base: str, token: str) -> None:
    from training.site.protocol import PROTOCOL_HEADER, SITE_API_PATH, SITE_PROTOCOL

    request = urllib.request.Request(
        base + SITE_API_PATH + "whoami/",
        headers={"Authorization": f"Site {token}", PROTOCOL_HEADER: str(SITE_PROTOCOL)},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        answer.read()


def measure_request_floor(roles, sites, site_url: str, *, requests: int, threads: int):
    """The centre's CPU, by role, per authenticated site request that does nothing
    (``GET whoami/``): authentication, the protocol check, the middleware, one answer. A
    round costs each site two requests, so twice this is the floor of a round's central cost
    per site on this server, measured beside it. (CPU time is counted in ticks of 10 ms, so
    the requests must be many: a thousand take a few seconds of CPU.)"""
    tokens = [sites[i % len(sites)].token for i in range(requests)]
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda token: _whoami(site_url, token), tokens[:threads]))  # warm
        before = cpu_snapshot(roles)
        list(pool.map(lambda token: _whoami(site_url, token), tokens))
        after = cpu_snapshot(roles)
    return {
        role: 1000 * (after[role] - before[role]) / len(tokens)
        for role in before
        if role not in ("site drivers", "scoring-worker")  # scoring may still be at work
    }


def start_drivers(sup, sites, url: str, var: Path, *, drivers: int, threads: int) -> None:
    """``drivers`` processes, each playing every ``drivers``-th site (``site_driver.py``)."""
    from training.queues import site_queue

    no_db = f"sqlite:///{var / 'no-such-folder' / 'site-drivers-have-no-database.sqlite3'}"
    for number in range(min(drivers, len(sites))):
        played = sites[number::drivers]
        listing = var / f"driver-{number}.json"
        listing.write_text(
            json.dumps(
                [
                    {
                        "slug": s.slug,
                        "token": s.token,
                        "key_path": str(s.key_path),
                        "data_root": str(s.data_root),
                    }
                    for s in played
                ]
            )
        )
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")]),
            "DATABASE_URL": no_db,
            "CENTRAL_URL": url,
            "SITE_DRIVER_SITES": str(listing),
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "site_driver",
            "worker",
            "-Q",
            ",".join(site_queue(s.slug) for s in played),
            "--pool",
            "threads",
            "--concurrency",
            str(threads),
            "--loglevel",
            "INFO",
            "--hostname",
            f"bench-driver-{number}@%h",
            "--without-gossip",
            "--without-mingle",
        ]
        # "site-..." so that round_overhead.site_phases reads the task phases they log.
        sup.start(f"site-driver-{number}", argv, env)


def _opened_rounds(job) -> int:
    from django.db.models import Max

    from training.models import Round

    return Round.objects.filter(job=job).aggregate(top=Max("index"))["top"] or 0


def run_size(args, n_sites: int, var: Path) -> SizeResult:
    from audit.models import LedgerCheckpoint
    from training.demo.processes import Supervisor
    from training.models import TERMINAL_STATES, JobState
    from training.queues import CENTRAL_QUEUE, SCORING_QUEUE, site_queue

    total_rounds = args.warmup + args.rounds + 1  # the last measured round ends when it opens
    started = time.monotonic()
    admin, consortium, sites = ro.seed_consortium(n_sites, var, shares=SHARES)
    seed_seconds = time.monotonic() - started
    print(f"  {n_sites} sites seeded in {seed_seconds:.1f} s", flush=True)
    ro.purge_queues([CENTRAL_QUEUE, SCORING_QUEUE, *[site_queue(s.slug) for s in sites]])
    (var / "logs").mkdir(parents=True, exist_ok=True)
    sup = Supervisor(var / "logs")
    deadline = time.monotonic() + args.timeout
    try:
        url, site_url = ro.start_central(sup, var, site_api=args.site_api == "wsgi")
        start_drivers(sup, sites, site_url, var, drivers=args.drivers, threads=args.threads)
        ro.wait_for_central(sup, (url, site_url), deadline)
        roles = central_processes(sup)
        # The heartbeats alone, before any job: they are per second, not per round (every site
        # beats every 30 s whatever the rounds do), so a long round carries more of them.
        idle: dict[str, float] = {}  # --idle 0: not measured
        if args.idle > 0:
            time.sleep(args.idle / 2)  # every site has beaten once; the beats are spread out
            idle_before = cpu_snapshot(roles)
            time.sleep(args.idle)
            idle_after = cpu_snapshot(roles)
            idle = {
                role: 1000 * (idle_after[role] - idle_before[role]) / (n_sites * args.idle)
                for role in idle_before
            }
        job = ro.propose_and_approve(admin, consortium, sites, total_rounds)
        first, last = args.warmup + 1, total_rounds
        before = after = None
        checkpoints_before = checkpoints_after = 0
        while True:
            opened = _opened_rounds(job)
            if before is None and opened >= first:
                before = cpu_snapshot(roles)
                checkpoints_before = LedgerCheckpoint.objects.count()
            if after is None and opened >= last:
                after = cpu_snapshot(roles)
                checkpoints_after = LedgerCheckpoint.objects.count()
            job.refresh_from_db(fields=["state", "end_reason"])
            if job.state in TERMINAL_STATES:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: job #{job.pk} is {job.state}, round {opened}")
            dead = sup.dead()
            if dead:
                raise RuntimeError(f"{dead[0].name} exited:\n{dead[0].tail()}")
            time.sleep(0.1)
        if job.state != JobState.COMPLETED or before is None or after is None:
            logs = "\n".join(f"--- {c.name} ---\n{c.tail(1500)}" for c in sup.children)
            raise RuntimeError(f"job #{job.pk} {job.state}: {job.end_reason}\n{logs}")
        figures = ro.platform_rounds(job, args.warmup, args.rounds)
        site_rounds = n_sites * args.rounds
        cpu = {role: 1000 * (after[role] - before[role]) / site_rounds for role in before}
        phases = ro.site_phases(sup, job.pk, range(first, last))
        central = next(c for c in sup.children if c.name == "central-worker")
        server = next(c for c in sup.children if c.name == "server")
        site_api = next((c for c in sup.children if c.name == ro.SITE_API_PROCESS), None)
        floor = {}
        if args.floor > 0:
            floor = measure_request_floor(
                roles, sites, site_url, requests=args.floor, threads=args.drivers * args.threads
            )
        coordinator_children = [
            ro._peak_rss_mib(p) or 0.0 for p in ro._children_of(central.proc.pid)
        ]
        return SizeResult(
            sites=n_sites,
            seed_seconds=seed_seconds,
            wall_per_round=[r.wall for r in figures],
            cpu_ms_per_site_round=cpu,
            coordinator_peak_mib=(
                ro._peak_rss_mib(central.proc.pid) or 0.0,
                max(coordinator_children, default=0.0),
            ),
            server_peak_mib=ro._peak_rss_mib(server.proc.pid) or 0.0,
            site_api_peak_mib=max(
                [ro._peak_rss_mib(p) or 0.0 for p in ro._children_of(site_api.proc.pid)]
                if site_api
                else [0.0]
            ),
            site_phases={k: statistics.median(v) for k, v in phases.items()},
            idle_ms_per_site_second=idle,
            floor_ms_per_request=floor,
            checkpoints_per_round=(checkpoints_after - checkpoints_before) / args.rounds,
        )
    finally:
        sup.stop_all()


def run_one(args) -> int:
    """One size in this process (``--one N``): a fresh database, the result as a JSON line."""
    var = Path(tempfile.mkdtemp(prefix="flc_bench_scale_"))
    ro.BENCH_DB = BENCH_DB
    cleanup = None
    try:
        where, cleanup = ro.prepare_database(var)
        broker = ro.prepare_environment(var)
        ro.setup_django()
        print(f"  database: {where}; broker: {broker}", flush=True)
        result = run_size(args, args.one, var)
        print(RESULT_PREFIX + json.dumps(asdict(result)), flush=True)
    finally:
        if cleanup is not None:
            cleanup()
        if args.keep:
            print(f"  kept {var}")
        else:
            shutil.rmtree(var, ignore_errors=True)
    return 0


# --- the report ------------------------------------------------------------------------------


def print_size(r: dict) -> None:
    walls = r["wall_per_round"]
    print(
        f"  {r['sites']} sites: wall per round {statistics.median(walls):.2f} s (median of "
        f"{len(walls)}: {', '.join(f'{w:.2f}' for w in walls)}); "
        f"seeded in {r['seed_seconds']:.0f} s"
    )
    print(
        "    CPU per site and round (ms): "
        + ", ".join(f"{role} {ms:.2f}" for role, ms in r["cpu_ms_per_site_round"].items())
    )
    central = sum(ms for role, ms in r["cpu_ms_per_site_round"].items() if role != "site drivers")
    print(f"    central CPU per site and round, all central processes: {central:.2f} ms")
    idle = r["idle_ms_per_site_second"]
    beats = sum(ms for role, ms in idle.items() if role not in ("site drivers", "scoring-worker"))
    wall = statistics.median(walls)
    work = sum(
        ms
        for role, ms in r["cpu_ms_per_site_round"].items()
        if role not in ("site drivers", "scoring-worker")
    )
    if idle:
        print(
            f"    heartbeats alone (no job): {beats:.3f} ms of central CPU per site and second, "
            f"so {beats * wall:.1f} ms of a {wall:.1f} s round; the round's own work without "
            f"scoring: {work - beats * wall:.1f} ms per site"
        )
    else:
        print("    heartbeats alone: not measured (--idle 0); the figures above include them")
    floor = r["floor_ms_per_request"]
    if floor:
        request = sum(floor.values())
        print(
            "    floor, an authenticated site request that does nothing (GET whoami/), central "
            "CPU per request (ms): "
            + ", ".join(f"{role} {ms:.2f}" for role, ms in floor.items())
            + f"; total {request:.2f} ms"
        )
        print(
            f"    a round's central CPU per site without scoring is {work:.1f} ms = "
            f"{work / (2 * request):.1f} x the floor of its two requests ({2 * request:.2f} ms)"
        )
    print(f"    ledger checkpoints signed per round: {r['checkpoints_per_round']:.1f}")
    main, child = r["coordinator_peak_mib"]
    print(
        f"    peak memory: coordinator {main:.0f} MiB (its largest child {child:.0f} MiB), "
        f"server {r['server_peak_mib']:.0f} MiB, site API (its largest process) "
        f"{r['site_api_peak_mib']:.0f} MiB"
    )
    if r["site_phases"]:
        print(
            "    site task phases (median, s): "
            + "  ".join(f"{k} {v:.4f}" for k, v in r["site_phases"].items())
        )


def print_marginal(results: list[dict]) -> None:
    print("per-site marginal cost of a round (how much longer a round took per site added):")
    for a, b in zip(results, results[1:], strict=False):
        wa, wb = (statistics.median(r["wall_per_round"]) for r in (a, b))
        per_site = 1000 * (wb - wa) / (b["sites"] - a["sites"])
        print(f"  {a['sites']} -> {b['sites']} sites: {per_site:.1f} ms per site")


def main() -> int:
    args = parse_args()
    if args.one:
        return run_one(args)
    broker = os.environ.get("CELERY_BROKER_URL", "")
    if not broker or broker.startswith("filesystem"):
        print(
            "round_scale.py needs a real broker: set CELERY_BROKER_URL (e.g. "
            "redis://127.0.0.1:6379/2, whose queues it purges)",
            file=sys.stderr,
        )
        return 2
    sizes = [int(n) for n in args.sites.split(",") if n.strip()]
    print(
        f"scale benchmark, {dt.date.today()} on {platform.node()}: {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {args.rounds} measured rounds after "
        f"{args.warmup} warm-up, {args.drivers} driver processes of {args.threads} threads"
    )
    results = []
    for n in sizes:
        print(f"{n} sites:", flush=True)
        argv = [sys.executable, __file__, "--one", str(n)]
        flags = ("rounds", "warmup", "drivers", "threads", "idle", "floor", "timeout", "site_api")
        for flag in flags:
            argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
        if args.keep:
            argv.append("--keep")
        proc = _run_size(argv)
        lines = proc.stdout.splitlines()
        for line in lines:
            if not line.startswith(RESULT_PREFIX):
                print(line)
        found = [json.loads(x[len(RESULT_PREFIX) :]) for x in lines if x.startswith(RESULT_PREFIX)]
        if proc.returncode or not found:
            print(proc.stderr[-4000:], file=sys.stderr)
            print(f"  {n} sites: failed (exit {proc.returncode})", file=sys.stderr)
            return 1
        results.append(found[0])
        print_size(found[0])
    if len(results) > 1:
        print_marginal(results)
    return 0


def _run_size(argv: list[str]) -> subprocess.CompletedProcess:
    """One size in a process of its own; stopped (Ctrl-C, SIGTERM) while it runs, it is told
    to stop as on Ctrl-C and waited for, so that it stops its platform's processes itself."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate()
        except KeyboardInterrupt:
            proc.terminate()
            proc.communicate(timeout=120)
            raise
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


if __name__ == "__main__":
    for stop in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop, ro.stop_like_ctrl_c)
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
