#!/usr/bin/env python
"""Ledger benchmark: append throughput and verification speed and memory.

    .venv/bin/python benchmarks/ledger.py [--appends N] [--verify-entries N]

Runs on whatever ``DATABASE_URL`` names (SQLite by default), in a throwaway
database of its own: on PostgreSQL it creates and drops ``flc_bench_ledger`` on
that server; on SQLite it uses a temporary file. These machines are noisy, so
every figure is printed with a baseline measured in the same run:

(a) appends/s through ``append_entry`` (one transaction each: head lock, chain
    hash, insert, head update) against plain ORM inserts of the same rows, also
    one transaction each, with no chaining;
(b) verification entries/s over the whole chain against hashing the same
    canonical bytes with hashlib alone and against merely reading the rows (through
    the ORM, as the issue measured, and through a raw cursor); on PostgreSQL also the
    check inside the database (``verify_ledger --in-database``),
    and the peak memory of a verification at a small and a large ledger, to
    show that it does not grow with the ledger's length.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import gc
import hashlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
BENCH_DB = "flc_bench_ledger"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=2000, help="appends per timed run")
    parser.add_argument(
        "--verify-entries", type=int, default=1_000_000, help="ledger length for (b)"
    )
    parser.add_argument(
        "--small-entries", type=int, default=100_000, help="smaller ledger for the memory check"
    )
    parser.add_argument("--chunk-size", type=int, default=5000, help="verify_chain chunk size")
    return parser.parse_args()


# --- a throwaway database ---------------------------------------------------------


def prepare_database(folder: Path | None = None) -> tuple[str, callable]:
    """Point DATABASE_URL at a fresh database; return a description and a cleanup.

    PostgreSQL: the database ``BENCH_DB`` on the server DATABASE_URL names, created afresh and
    dropped by the cleanup. SQLite: ``bench.sqlite3`` in ``folder`` (which the caller keeps;
    other processes of a benchmark may open it), or in a temporary folder the cleanup removes.
    """
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://", "pgsql://")):
        import psycopg2

        parts = urlsplit(url)
        admin = psycopg2.connect("postgresql://" + url.split("://", 1)[1])
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f"DROP DATABASE IF EXISTS {BENCH_DB}")
            cursor.execute(f"CREATE DATABASE {BENCH_DB}")
        os.environ["DATABASE_URL"] = urlunsplit(parts._replace(path=f"/{BENCH_DB}"))

        def cleanup():
            from django.db import connections

            connections.close_all()
            with admin.cursor() as cursor:
                # FORCE: a benchmark's server processes may still hold a connection.
                cursor.execute(f"DROP DATABASE IF EXISTS {BENCH_DB} WITH (FORCE)")
            admin.close()

        return f"PostgreSQL (database {BENCH_DB} on {parts.hostname}:{parts.port})", cleanup
    temporary = None
    if folder is None:
        temporary = tempfile.TemporaryDirectory(prefix="flc_bench_")
        folder = Path(temporary.name)
    os.environ["DATABASE_URL"] = f"sqlite:///{folder}/bench.sqlite3"

    def cleanup():
        from django.db import connections

        connections.close_all()
        if temporary is not None:
            temporary.cleanup()

    return f"SQLite (temporary file {folder}/bench.sqlite3)", cleanup


def setup_django():
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "consortium.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    os.environ.setdefault("DJANGO_DEBUG", "false")  # DEBUG keeps every query: not production
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


# --- helpers ------------------------------------------------------------------------


@contextlib.contextmanager
def ledger_guard_off():
    """Plant or wipe ledger rows directly, as the database superuser the benchmark runs as.

    On PostgreSQL the ledger's triggers refuse TRUNCATE, rows that do not chain on the head
    and head jumps (audit migration 0004); ``session_replication_role = replica`` switches
    them off for this session, which only a superuser may do. The timed appends run with the
    triggers on: their cost is the product's.
    """
    from django.db import connection

    if connection.vendor != "postgresql":
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SHOW session_replication_role")
        (before,) = cursor.fetchone()
        cursor.execute("SET session_replication_role = replica")
    try:
        yield
    finally:
        # What it was: an enclosing block may still want the triggers off.
        with connection.cursor() as cursor:
            cursor.execute("SELECT set_config('session_replication_role', %s, false)", [before])


@ledger_guard_off()
def reset_ledger():
    from django.db import connection

    from audit.ledger.chain import GENESIS_HASH
    from audit.models import LedgerHead

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # A benchmark database only (and the triggers are off: see ledger_guard_off).
            cursor.execute("TRUNCATE audit_ledgerentry")
        else:
            cursor.execute("DELETE FROM audit_ledgerentry")
    LedgerHead.objects.update_or_create(pk=1, defaults={"seq": 0, "entry_hash": GENESIS_HASH})
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE audit_ledgerentry")


def payload(i: int) -> dict:
    return {
        "name": f"Hospital {i}",
        "slug": f"hospital-{i}",
        "country": "GB",
        "worker_key_fingerprint": hashlib.sha256(str(i).encode()).hexdigest()[:16],
    }


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


# --- (a) appends ------------------------------------------------------------------------


def bench_appends(n: int) -> dict:
    from django.db import transaction
    from django.utils import timezone

    from audit.ledger.canonical import canonical_json
    from audit.ledger.chain import append_entry
    from audit.models import LedgerEntry

    @ledger_guard_off()  # the baseline writes rows that do not chain
    def plain_inserts() -> float:
        reset_ledger()
        started = time.perf_counter()
        for i in range(1, n + 1):
            with transaction.atomic():
                LedgerEntry.objects.create(
                    seq=i,
                    prev_hash="0" * 64,
                    entry_hash=f"{i:064x}",
                    event="institution.created",
                    actor=None,
                    actor_id_at_write=None,
                    actor_repr="system",
                    subject_type="consortium.institution",
                    subject_id=str(i),
                    consortium_slug="bench",
                    institution_slug=f"hospital-{i}",
                    payload_text=canonical_json(payload(i)),
                    created_at=timezone.now(),
                )
        return time.perf_counter() - started

    def chained_appends() -> float:
        reset_ledger()
        started = time.perf_counter()
        for i in range(1, n + 1):
            append_entry(
                event="institution.created",
                payload=payload(i),
                consortium_slug="bench",
                institution_slug=f"hospital-{i}",
            )
        return time.perf_counter() - started

    from django.db import connection

    from audit.ledger import chain as ledger

    # Interleaved, best of three each: the machine's noise hits all alike.
    plain, chained, orm_chained = [], [], []
    for _ in range(3):
        plain.append(plain_inserts())
        chained.append(chained_appends())
        if connection.vendor == "postgresql":
            # The same appends through save() + update(): one round trip more.
            ledger._FAST_APPEND = False
            try:
                orm_chained.append(chained_appends())
            finally:
                ledger._FAST_APPEND = True
    assert ledger.verify_chain().ok
    return {
        "plain_rate": rate(n, min(plain)),
        "chained_rate": rate(n, min(chained)),
        "plain_runs": [rate(n, t) for t in plain],
        "chained_runs": [rate(n, t) for t in chained],
        "orm_rate": rate(n, min(orm_chained)) if orm_chained else None,
        "orm_runs": [rate(n, t) for t in orm_chained],
    }


# --- (b) verification -------------------------------------------------------------------

BASE_TIME = dt.datetime(2026, 11, 26, 8, 0, tzinfo=dt.UTC)


class ChainWriter:
    """Writes a valid chain fast (COPY on PostgreSQL, executemany on SQLite),
    timing the hashlib part of the work on the way: the baseline for (b)."""

    def __init__(self, consortium_slug: str = "bench", *, seq: int = 0, prev: str = "0" * 64):
        # ``seq``/``prev``: continue an existing chain (its head) instead of starting one.
        self.consortium_slug = consortium_slug
        self.seq = seq
        self.prev = prev
        self.hash_seconds = 0.0
        self.hashed = 0

    @ledger_guard_off()
    def extend_to(self, total: int, batch: int = 20_000) -> None:
        from django.db import connection

        from audit.ledger.canonical import canonical_json
        from audit.ledger.chain import entry_canonical_text
        from audit.models import LedgerHead

        while self.seq < total:
            rows, texts = [], []
            for seq in range(self.seq + 1, min(total, self.seq + batch) + 1):
                created = BASE_TIME + dt.timedelta(milliseconds=seq)
                fields = dict(
                    seq=seq,
                    event="round.update" if seq % 3 else "job.approved",
                    actor_id=None,
                    actor_repr="system",
                    subject_type="training.siteupdate",
                    subject_id=str(seq),
                    consortium_slug=self.consortium_slug,
                    institution_slug=f"hospital-{seq % 7}",
                    payload_text=canonical_json(payload(seq)),
                    created_at=created,
                )
                texts.append(entry_canonical_text(**fields).encode())
                rows.append(fields)
            # The baseline: hashlib alone over the very bytes verification hashes.
            sha256, prev = hashlib.sha256, self.prev
            hashes = []
            started = time.perf_counter()
            for text in texts:
                digest = sha256(prev.encode())
                digest.update(text)
                prev = digest.hexdigest()
                hashes.append(prev)
            self.hash_seconds += time.perf_counter() - started
            self.hashed += len(texts)
            self._write(connection, rows, hashes)
            self.prev = prev
            self.seq = rows[-1]["seq"]
        LedgerHead.objects.update_or_create(
            pk=1, defaults={"seq": self.seq, "entry_hash": self.prev}
        )

    def _write(self, connection, rows, hashes):
        prev = [self.prev, *hashes[:-1]]
        columns = (
            "seq, prev_hash, entry_hash, event, actor_id, actor_id_at_write, actor_repr, "
            "subject_type, subject_id, consortium_slug, institution_slug, payload_text, "
            "created_at"
        )
        values = [
            (
                r["seq"],
                p,
                h,
                r["event"],
                None,
                None,
                r["actor_repr"],
                r["subject_type"],
                r["subject_id"],
                r["consortium_slug"],
                r["institution_slug"],
                r["payload_text"],
                r["created_at"],
            )
            for r, p, h in zip(rows, prev, hashes, strict=True)
        ]
        with connection.cursor() as cursor:
            if connection.vendor == "postgresql":
                buffer = io.StringIO()
                writer = csv.writer(buffer)
                for v in values:
                    writer.writerow(
                        [
                            ("" if x is None else x.isoformat() if hasattr(x, "isoformat") else x)
                            for x in v
                        ]
                    )
                buffer.seek(0)
                cursor.cursor.copy_expert(
                    f"COPY audit_ledgerentry ({columns}) FROM STDIN WITH (FORMAT csv)", buffer
                )
            else:
                values = [(*v[:-1], v[-1].replace(tzinfo=None).isoformat(sep=" ")) for v in values]
                cursor.executemany(
                    f"INSERT INTO audit_ledgerentry ({columns}) VALUES ({', '.join(['%s'] * 13)})",
                    values,
                )


def time_verify(chunk_size: int) -> tuple[float, object]:
    from audit.ledger.chain import verify_chain

    gc.collect()
    started = time.perf_counter()
    result = verify_chain(chunk_size=chunk_size)
    return time.perf_counter() - started, result


def time_verify_in_database(chunk_size: int) -> float | None:
    """PostgreSQL recomputing the chain itself (``verify_ledger --in-database``)."""
    from django.db import connection

    from audit.ledger.chain import verify_chain_in_database

    if connection.vendor != "postgresql":
        return None
    gc.collect()
    started = time.perf_counter()
    result = verify_chain_in_database(chunk_size=chunk_size)
    seconds = time.perf_counter() - started
    assert result.ok, result.summary()
    return seconds


def time_read_only(chunk_size: int) -> float:
    """The plain read the issue measured: the same rows through the ORM, no model instances."""
    from audit.ledger.chain import _rows

    started = time.perf_counter()
    for _ in _rows(chunk_size):
        pass
    return time.perf_counter() - started


def time_raw_read(chunk_size: int) -> float:
    """The plainest read: the same columns through the driver's cursor, in the same batches
    and the same read transaction, every value as the driver gives it (no checking)."""
    from django.db import connection, transaction

    from audit.ledger.chain import _CHAIN_DB_COLUMNS

    columns = ", ".join(connection.ops.quote_name(c) for c in _CHAIN_DB_COLUMNS)
    started = time.perf_counter()
    with transaction.atomic():
        cursor = connection.chunked_cursor()
        cursor.execute(f"SELECT {columns} FROM audit_ledgerentry ORDER BY seq")  # noqa: S608
        while cursor.fetchmany(chunk_size):
            pass
        cursor.close()
    return time.perf_counter() - started


def memory_of_verify(chunk_size: int) -> dict:
    import tracemalloc

    from audit.ledger.chain import verify_chain

    gc.collect()
    can_reset = reset_peak_rss()
    rss_before = rss_kib("VmRSS")
    result = verify_chain(chunk_size=chunk_size)
    rss_peak = rss_kib("VmHWM")
    assert result.ok, result.summary()
    tracemalloc.start()
    verify_chain(chunk_size=chunk_size)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "rss_growth_kib": (rss_peak - rss_before) if can_reset else None,
        "traced_peak_kib": traced_peak // 1024,
    }


def bench_verify(total: int, small: int, chunk_size: int) -> dict:
    reset_ledger()
    writer = ChainWriter()
    out = {}
    for size in sorted({min(small, total), total}):
        started = time.perf_counter()
        writer.extend_to(size)
        if os.environ["DATABASE_URL"].startswith("postgres"):
            from django.db import connection

            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE audit_ledgerentry")
        fill = time.perf_counter() - started
        # Interleaved, best of 3 each: the machine is noisy.
        verify_runs, read_runs, raw_runs, in_database_runs = [], [], [], []
        for _ in range(3):
            seconds, result = time_verify(chunk_size)
            assert result.ok and result.entry_count == size, result.summary()
            verify_runs.append(seconds)
            read_runs.append(time_read_only(chunk_size))
            raw_runs.append(time_raw_read(chunk_size))
            in_database = time_verify_in_database(chunk_size)
            if in_database is not None:
                in_database_runs.append(in_database)
        seconds = min(verify_runs)
        hashlib_rate = rate(writer.hashed, writer.hash_seconds)
        out[size] = {
            "fill_seconds": fill,
            "verify_seconds": seconds,
            "verify_rate": rate(size, seconds),
            "read_rate": rate(size, min(read_runs)),
            "raw_read_rate": rate(size, min(raw_runs)),
            "in_database_rate": rate(size, min(in_database_runs)) if in_database_runs else None,
            "hashlib_rate": hashlib_rate,
            "memory": memory_of_verify(chunk_size),
        }
    return out


def print_setting(title: str, where: str) -> None:
    """The benchmark's first lines: date, machine, Python, and the database it measures."""
    from django.db import connection

    print(
        f"{title}, {dt.date.today()} on {platform.node()}: "
        f"{os.cpu_count()} cores, Python {platform.python_version()}"
    )
    if connection.vendor == "sqlite":
        server = ".".join(map(str, connection.Database.sqlite_version_info))
    else:
        server = str(connection.cursor().connection.server_version)
    print(f"database: {where}, server {connection.vendor} {server}")


def main() -> int:
    args = parse_args()
    where, cleanup = prepare_database()
    try:
        setup_django()
        print_setting("ledger benchmark", where)
        print()
        a = bench_appends(args.appends)
        print(
            f"(a) appends, single writer, one transaction each, {args.appends} per run, "
            "best of 3 interleaved runs"
        )
        print(
            f"    plain ORM inserts (baseline): {a['plain_rate']:9.0f} /s   "
            f"runs {', '.join(f'{r:.0f}' for r in a['plain_runs'])}"
        )
        print(
            f"    append_entry (chained):       {a['chained_rate']:9.0f} /s   "
            f"runs {', '.join(f'{r:.0f}' for r in a['chained_runs'])}"
        )
        print(f"    ratio chained / plain:        {a['chained_rate'] / a['plain_rate']:9.2f}")
        if a["orm_rate"]:
            print(
                f"    append_entry, ORM insert+update (the pre-CTE path): {a['orm_rate']:.0f} /s"
                f"   runs {', '.join(f'{r:.0f}' for r in a['orm_runs'])}   "
                f"ratio to plain {a['orm_rate'] / a['plain_rate']:.2f}"
            )
        print()
        b = bench_verify(args.verify_entries, args.small_entries, args.chunk_size)
        print(f"(b) verify_chain(chunk_size={args.chunk_size}) over the whole chain")
        for size, r in b.items():
            m = r["memory"]
            growth = m["rss_growth_kib"]
            rss = f"{growth / 1024:.1f} MiB" if growth is not None else "n/a"
            print(f"    {size:>9,} entries (filled in {r['fill_seconds']:.0f} s):")
            print(
                f"      verify:                   {r['verify_rate']:9.0f} entries/s "
                f"({r['verify_seconds']:.2f} s)"
            )
            print(
                f"      hashlib alone (baseline): {r['hashlib_rate']:9.0f} entries/s   "
                f"ratio verify/hashlib {r['verify_rate'] / r['hashlib_rate']:.3f}"
            )
            print(
                f"      reading rows alone (ORM): {r['read_rate']:9.0f} entries/s   "
                f"ratio verify/read {r['verify_rate'] / r['read_rate']:.3f}"
            )
            print(
                f"      reading rows, raw cursor: {r['raw_read_rate']:9.0f} entries/s   "
                f"ratio verify/raw read {r['verify_rate'] / r['raw_read_rate']:.3f}"
            )
            if r["in_database_rate"]:
                print(
                    f"      verify --in-database:     {r['in_database_rate']:9.0f} entries/s   "
                    f"ratio to the ORM read {r['in_database_rate'] / r['read_rate']:.3f}, "
                    f"to verify {r['in_database_rate'] / r['verify_rate']:.2f}"
                )
            print(
                f"      peak memory: RSS growth {rss}, Python heap peak "
                f"{m['traced_peak_kib'] / 1024:.1f} MiB (tracemalloc)"
            )
        if len(b) == 2:
            (small, rs), (large, rl) = sorted(b.items())
            heap_ratio = rl["memory"]["traced_peak_kib"] / max(rs["memory"]["traced_peak_kib"], 1)
            print(
                f"    memory ratio {large:,} / {small:,} entries: Python heap peak "
                f"{heap_ratio:.2f} (ledger {large / small:.0f}x longer)"
            )
    finally:
        cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
