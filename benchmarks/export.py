#!/usr/bin/env python
"""Contribution-report export benchmark: a CSV report over a long ledger streams with flat memory.

    .venv/bin/python benchmarks/export.py [--entries N] [--small-entries N] [--sites K]

Runs on whatever ``DATABASE_URL`` names (SQLite by default), in a throwaway database of its own
(``benchmarks/ledger.py``'s helpers: a temporary SQLite file, or on PostgreSQL a database named
after the one in ``DATABASE_URL`` with ``_bench_export`` appended, created and dropped here).

The ledger is one job's history, the worst case for a job's report, since every entry is in it:
per round ``round.opened``, ``K`` ``round.update_accepted`` (with a privacy event each, as the
site API writes them), ``round.closed`` and ``contribution.scored`` (leave-one-out, ``K + 1``
coalitions), ``K + 3`` entries a round; one site withdraws its consent at the end, so every round's
model is listed again as derived from its contributions (the short ledger's withdrawal stays in
the long one, whose rounds go on after it). The report's CSV therefore grows with the
ledger (about 2.2 rows per entry at K = 10); its memory must not.

Measured at ``--small-entries`` and ``--entries`` (default 100,000 and 1,000,000), with a
baseline from the same run: merely iterating the same ledger rows once (``values_list(...)
.iterator()``, the columns the report reads), without parsing them.

* throughput: ledger entries per second of the whole export (``audit.reports.files.write_report``
  of the CSV: two ordered passes over the ledger, every payload parsed, every row formatted and
  hashed), and as a ratio to the baseline;
* memory: the growth of the process's peak RSS during one export (VmHWM reset before it), and the
  Python heap peak under ``tracemalloc`` in a second export; the ratio of the heap peaks at the
  two ledger lengths is the "flat memory" figure (1.0 = does not grow).

The CSV goes to a sink that hashes and counts the bytes and keeps none (``--spool`` writes it to
the spooled temporary file the web export uses instead, which moves to disk past 1 MiB).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import hashlib
import importlib.util
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_spec = importlib.util.spec_from_file_location("bench_ledger", ROOT / "benchmarks" / "ledger.py")
bench_ledger = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_ledger)

CONSORTIUM = "bench"
JOB_ID = 1
AGREEMENT_DIGEST = "a" * 64


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1_000_000, help="the long ledger")
    parser.add_argument("--small-entries", type=int, default=100_000, help="the short ledger")
    parser.add_argument("--sites", type=int, default=10, help="sites in the job")
    parser.add_argument("--spool", action="store_true", help="write to a spooled temp file")
    args = parser.parse_args()
    if args.sites < 4:  # the planted withdrawal is the fourth site's
        parser.error("--sites must be at least 4")
    return args


def prepare_database():
    url = os.environ.get("DATABASE_URL", "")
    if url.startswith(("postgres://", "postgresql://", "pgsql://")):
        base = url.rsplit("/", 1)[-1].split("?", 1)[0] or "postgres"
        bench_ledger.BENCH_DB = f"{base}_bench_export"
    return bench_ledger.prepare_database()


# --- the ledger ---------------------------------------------------------------------------------


def _h(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class HistoryWriter(bench_ledger.ChainWriter):
    """Writes a valid chain of one job's rounds (``ChainWriter``'s fast path: executemany on
    SQLite, COPY on PostgreSQL), continuing from where it stopped."""

    def __init__(self, sites: int):
        super().__init__()
        self.sites = [f"hospital-{i:02d}" for i in range(sites)]
        self.round = 0
        self.lineage = _h("genesis")
        self.pending: list[tuple[str, str, dict]] = []
        self.started = False

    def _next_entries(self):
        from audit.ledger.canonical import canonical_json

        if not self.started:
            self.started = True
            terms = {"agreement_id": 1, "epsilon_cap": "1000", "delta": "0.00001"}
            self.pending += [
                (
                    "agreement.version_published",
                    "",
                    {
                        "agreement_id": 1,
                        "version": 1,
                        "content_digest": AGREEMENT_DIGEST,
                        "terms": terms,
                    },
                ),
                (
                    "job.proposed",
                    "",
                    {
                        "job_id": JOB_ID,
                        "title": "Benchmark job",
                        "agreement_digest": AGREEMENT_DIGEST,
                        "agreement_version": 1,
                        "participants": self.sites,
                    },
                ),
            ]
        if not self.pending:
            self.round += 1
            r = self.round
            self.pending.append(
                ("round.opened", "", {"job_id": JOB_ID, "round": r, "sites": self.sites})
            )
            digests = {}
            for site in self.sites:
                digest = _h(f"{r}{site}")
                digests[site] = digest
                self.pending.append(
                    (
                        "round.update_accepted",
                        site,
                        {
                            "job_id": JOB_ID,
                            "round": r,
                            "site": site,
                            "credential": "fls_abcdefgh",
                            "global_model": self.lineage,
                            "start_model": self.lineage,
                            "samples": 500,
                            "update_digest": digest,
                            "signature": digest + digest,
                            "size_bytes": 1234,
                            "pipeline": [{"filter": "gaussian_noise", "noise_multiplier": 1.1}],
                            "privacy_events": [
                                {
                                    "mechanism": "gaussian",
                                    "params": {"noise_multiplier": 1.1},
                                    "count": 1,
                                    "source": "gaussian_noise",
                                }
                            ],
                            "metrics": {"loss": 0.5, "samples": 500},
                        },
                    )
                )
            model = _h(f"model {r}")
            parent, self.lineage = self.lineage, _h(f"lineage {r}")
            self.pending.append(
                (
                    "round.closed",
                    "",
                    {
                        "job_id": JOB_ID,
                        "round": r,
                        "global_digest": model,
                        "parent_lineage_hash": parent,
                        "lineage_hash": self.lineage,
                        "sites": digests,
                    },
                )
            )
            coalitions = [{"sites": self.sites, "value": 0.75}] + [
                {"sites": [s for s in self.sites if s != left], "value": 0.7} for left in self.sites
            ]
            self.pending.append(
                (
                    "contribution.scored",
                    "",
                    {
                        "job_id": JOB_ID,
                        "round": r,
                        "method": "leave_one_out",
                        "params": {},
                        "metric": "accuracy",
                        "sites": self.sites,
                        "coalitions": coalitions,
                        "scores": {s: 0.05 for s in self.sites},
                        "evaluations": len(self.sites) + 1,
                    },
                )
            )
        event, site, payload = self.pending.pop(0)
        return event, site, canonical_json(payload)

    @bench_ledger.ledger_guard_off()
    def extend_to(self, total: int, batch: int = 20_000) -> None:
        from django.db import connection

        from audit.ledger.canonical import canonical_json
        from audit.ledger.chain import entry_canonical_text
        from audit.models import LedgerHead

        while self.seq < total:
            rows, texts = [], []
            for seq in range(self.seq + 1, min(total, self.seq + batch) + 1):
                if seq == total:  # the last entry: a withdrawal of consent
                    event, site = "consent.withdrawn", self.sites[3]
                    payload_text = canonical_json({"agreement_id": 1, "reason": "benchmark"})
                else:
                    event, site, payload_text = self._next_entries()
                fields = dict(
                    seq=seq,
                    event=event,
                    actor_id=None,
                    actor_repr="system",
                    subject_type="training.round",
                    subject_id=str(self.round),
                    consortium_slug=CONSORTIUM,
                    institution_slug=site,
                    payload_text=payload_text,
                    created_at=bench_ledger.BASE_TIME + dt.timedelta(milliseconds=seq),
                )
                texts.append(entry_canonical_text(**fields).encode())
                rows.append(fields)
            prev, hashes = self.prev, []
            for text in texts:
                digest = hashlib.sha256(prev.encode())
                digest.update(text)
                prev = digest.hexdigest()
                hashes.append(prev)
            self._write(connection, rows, hashes)
            self.prev = prev
            self.seq = rows[-1]["seq"]
        LedgerHead.objects.update_or_create(
            pk=1, defaults={"seq": self.seq, "entry_hash": self.prev}
        )


# --- measuring ---------------------------------------------------------------------------------


class NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


def export_once(spool: bool) -> tuple[float, str, int, int]:
    from audit.reports.build import build_report
    from audit.reports.files import write_report
    from audit.reports.scope import Scope
    from audit.reports.services import spool as make_spool

    report = build_report(Scope("job", CONSORTIUM, job_id=JOB_ID))
    out = make_spool() if spool else NullSink()
    rows = 0
    started = time.perf_counter()
    digest, size = write_report(report, "csv", out)
    seconds = time.perf_counter() - started
    if spool:
        out.seek(0)
        rows = sum(1 for _ in out) - 1
        out.close()
    return seconds, digest, size, rows


def read_rows_once() -> float:
    from audit.models import LedgerEntry

    started = time.perf_counter()
    for _ in (
        LedgerEntry.objects.filter(consortium_slug=CONSORTIUM)
        .order_by("seq")
        .values_list("seq", "event", "institution_slug", "created_at", "payload_text")
        .iterator(chunk_size=2000)
    ):
        pass
    return time.perf_counter() - started


def memory_of_export(spool: bool) -> dict:
    import tracemalloc

    gc.collect()
    can_reset = bench_ledger.reset_peak_rss()
    before = bench_ledger.rss_kib("VmRSS")
    export_once(spool)
    peak = bench_ledger.rss_kib("VmHWM")
    gc.collect()
    tracemalloc.start()
    export_once(spool)
    _, traced = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"rss_growth_kib": (peak - before) if can_reset else None, "heap_kib": traced // 1024}


def main() -> int:
    args = parse_args()
    where, cleanup = prepare_database()
    try:
        bench_ledger.setup_django()
        from django.db import connection

        bench_ledger.print_setting("export benchmark", where)
        print(
            f"one job, {args.sites} sites, {args.sites + 3} entries a round; CSV to "
            f"{'a spooled temporary file' if args.spool else 'a hashing sink'}"
        )
        bench_ledger.reset_ledger()
        writer = HistoryWriter(args.sites)
        results = {}
        for size in sorted({min(args.small_entries, args.entries), args.entries}):
            started = time.perf_counter()
            writer.extend_to(size)
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("VACUUM ANALYZE audit_ledgerentry")
            fill = time.perf_counter() - started
            from audit.ledger.chain import verify_chain

            assert verify_chain().ok
            if not results:
                export_once(args.spool)  # warm-up: lazy imports, the accountant's caches
            read = min(read_rows_once() for _ in range(2))
            seconds, digest, size_bytes, rows = export_once(args.spool)
            memory = memory_of_export(args.spool)
            results[size] = dict(
                fill=fill, read=read, export=seconds, bytes=size_bytes, memory=memory
            )
            print(
                f"  {size:>9,} entries ({writer.round:,} rounds, filled in {fill:.1f} s): "
                f"export {rate(size, seconds):,.0f} entries/s ({seconds:.1f} s, "
                f"{size_bytes / 2**20:,.1f} MiB of CSV{f', {rows:,} rows' if rows else ''}); "
                f"read rows alone {rate(size, read):,.0f} /s; export/read "
                f"{read / seconds:.3f}; RSS growth "
                f"{_mib(memory['rss_growth_kib'])}; heap peak {memory['heap_kib'] / 1024:.1f} MiB"
            )
        sizes = sorted(results)
        if len(sizes) == 2:
            small, large = (results[s]["memory"]["heap_kib"] for s in sizes)
            print(
                f"heap peak ratio {sizes[1]:,} / {sizes[0]:,} entries: {large / small:.2f} "
                f"(ledger {sizes[1] / sizes[0]:.0f}x longer)"
            )
    finally:
        cleanup()
    return 0


def rate(n: int, seconds: float) -> float:
    return bench_ledger.rate(n, seconds)


def _mib(kib) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
