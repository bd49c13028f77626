#!/usr/bin/env python
"""The privacy accountant's cost: version 2 (exact fractional orders) against version 1.

    .venv/bin/python benchmarks/accountant.py [--repeats R]

For a few DP-SGD mechanisms (noise multiplier z, sampling rate q) it times the first replay of
one mechanism, the RDP curve over every order computed from nothing (what a process pays the
first time it meets the mechanism; the curve is cached after), with the accountant's version 1
(dp-accounting's curves) as the baseline and version 2 (the sampled Gaussian's fractional orders
by the signed series, ``training.jobs.rdp_fractional``), alternated in the same run, best of R;
and a warm replay of 50 events (the cached curves summed and converted to ε). Prints each as a
ratio to version 1. No target: the figures say what the exact orders cost.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from training.jobs import accounting as accountant  # noqa: E402
from training.jobs.accounting import PrivacyEvent, accountant_version, epsilon_spent  # noqa: E402

MECHANISMS = ((0.7, 0.2), (1.1, 0.01), (2.5, 0.1), (0.9, 0.05), (1.0, 0.028))


def first_replay(key: tuple, version: int) -> float:
    accountant._unit_rdp.cache_clear()
    accountant._rdp_epsilon_of.cache_clear()
    started = time.perf_counter()
    accountant._unit_rdp(key, version)
    return time.perf_counter() - started


def warm_replay(version: int) -> float:
    events = [
        PrivacyEvent("sampled_gaussian", {"noise_multiplier": z, "sample_rate": q, "steps": s})
        for s in range(1, 11)
        for z, q in MECHANISMS
    ]
    with accountant_version(version):
        epsilon_spent(events, delta=1e-5)  # warm the curves
        accountant._rdp_epsilon_of.cache_clear()
        started = time.perf_counter()
        epsilon_spent(events, delta=1e-5)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    accountant._dp()  # dp-accounting's imports, outside the timings
    print("first replay of one DP-SGD mechanism (every order), best of", args.repeats)
    print("| z | q | version 1 (s) | version 2 (s) | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for z, q in MECHANISMS:
        key = ("sampled_gaussian", z, q)
        one, two = [], []
        for _ in range(args.repeats):
            one.append(first_replay(key, 1))
            two.append(first_replay(key, 2))
        print(f"| {z} | {q} | {min(one):.3f} | {min(two):.3f} | {min(two) / min(one):.2f} |")
    one = min(warm_replay(1) for _ in range(args.repeats))
    two = min(warm_replay(2) for _ in range(args.repeats))
    print(
        f"\nwarm replay of 50 events: version 1 {one * 1e3:.2f} ms, version 2 {two * 1e3:.2f} ms, "
        f"ratio {two / one:.2f}"
    )


if __name__ == "__main__":
    main()
