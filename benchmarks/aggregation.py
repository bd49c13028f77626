#!/usr/bin/env python
"""Aggregation benchmark: streaming FedAvg throughput and peak memory.

    .venv/bin/python benchmarks/aggregation.py [--params N] [--repeats R]   # R rounds, default 15

(a) Throughput of ``StreamingFedAvg.add`` on an N-parameter float32 update (one tensor), as a
    ratio to a plain memory copy of the same bytes (``dst.copy_(src)`` into a warm buffer), both
    measured in this run. The operations run round-robin, R rounds, and each keeps its best
    time: on a shared machine the load changes from second to second, and interleaving exposes
    the copy and the adds to the same moments. Reported for the unmasked add (the common case),
    the masked add (a site that shared 40% of coordinates, bool mask as sent on the wire), and
    a float64 accumulator.
(b) Peak memory for 3, 10 and 50 sites: each case runs in a fresh child process, which builds the
    sites' updates one at a time (as they arrive from the network), folds each in and drops it,
    then takes the result. The figure is the growth of the child's peak RSS (``ru_maxrss``) over
    its RSS after the imports and the model template, in MiB. Flat = independent of site count.
    (tracemalloc does not see torch's allocations; psutil is not installed.)
"""

from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.fl.aggregate import StreamingFedAvg  # noqa: E402


def best_interleaved(cases: list[tuple[str, object]], rounds: int) -> dict[str, float]:
    """Each case's best time over ``rounds`` round-robin rounds (after one warm-up call each)."""
    for _label, fn in cases:
        fn()
    best = {label: float("inf") for label, _ in cases}
    for _ in range(rounds):
        for label, fn in cases:
            start = time.perf_counter()
            fn()
            best[label] = min(best[label], time.perf_counter() - start)
    return best


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(sites: int, params: int) -> None:
    template = {"w": torch.zeros(params)}
    agg = StreamingFedAvg(template)
    g = torch.Generator().manual_seed(0)
    # Load the compiled kernels first: numba's code is a fixed cost of the process (about
    # 50 MiB), not memory that grows with the sites.
    warm = StreamingFedAvg({"w": torch.zeros(8)})
    warm.add({"w": torch.ones(8)}, {"w": torch.ones(8, dtype=torch.bool)}, 1.0)
    base = rss_mib()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    for i in range(sites):
        delta = {"w": torch.randn(params, generator=g)}
        mask = {"w": torch.rand(params, generator=g) < 0.5} if i % 2 else None
        agg.add(delta, mask, float(i + 1))
        del delta, mask
    result = agg.result()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{max(peak, peak_before) - base:.1f} {result['w'].numel()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.params)
        return
    n = args.params
    mib = n * 4 / 2**20
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {n:,} float32 parameters ({mib:.1f} MiB per update)"
    )
    g = torch.Generator().manual_seed(0)
    src = torch.randn(n, generator=g)
    dst = torch.empty(n)
    delta = {"w": src}
    mask = {"w": torch.rand(n, generator=g) < 0.4}
    agg32 = StreamingFedAvg(delta)
    agg64 = StreamingFedAvg(delta, dtype=torch.float64)
    cases = [
        ("copy_ (baseline)", lambda: dst.copy_(src)),
        ("add, unmasked, float32 accumulator", lambda: agg32.add(delta, None, 3.0)),
        ("add, masked 40%, float32 accumulator", lambda: agg32.add(delta, mask, 3.0)),
        ("add, unmasked, float64 accumulator", lambda: agg64.add(delta, None, 3.0)),
        ("result() (once per round)", agg32.result),
    ]
    times = best_interleaved(cases, args.repeats)
    copy = times["copy_ (baseline)"]
    rows = list(times.items())
    print("(a) throughput, update bytes per second")
    print(f"{'operation':40s} {'ms':>8s} {'GB/s':>7s} {'vs copy':>8s}")
    for label, seconds in rows:
        print(
            f"{label:40s} {seconds * 1e3:8.2f} {n * 4 / seconds / 1e9:7.2f} {copy / seconds:8.2f}"
        )
    print("(b) peak RSS growth while aggregating (MiB), fresh process per case")
    for sites in (3, 10, 50):
        out = subprocess.run(
            [sys.executable, __file__, "--child", str(sites), "--params", str(n)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.split()
        growth = float(out[0])
        print(f"{sites:3d} sites: {growth:7.1f} MiB  ({growth / mib:.2f} updates' worth)")


if __name__ == "__main__":
    main()
