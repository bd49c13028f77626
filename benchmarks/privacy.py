#!/usr/bin/env python
"""Privacy filter benchmark: each filter's cost on a 10-million-parameter update.

    .venv/bin/python benchmarks/privacy.py [--params N] [--repeats R] [--only TEXT]

Every figure is a multiple of ONE AGGREGATION PASS over the same update, measured in the same run:
``StreamingFedAvg.add(delta, None, weight)`` on a warm accumulator. The update is one layer of N
float32 values plus a small bias, drawn from N(0, 1). Each pipeline runs on a reused ``Workspace``
(as a site worker does across rounds). After one warm-up call each, the baseline and the
pipelines run round-robin for R rounds and each keeps its best time: on a shared machine the load
changes from second to second, and interleaving exposes the baseline and the pipelines to the
same moments.

Target: partial_sharing(topk 0.4) + percentile_clipping + gaussian_noise at most 10 passes.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training.fl.aggregate import StreamingFedAvg  # noqa: E402
from training.fl.filters import apply_pipeline  # noqa: E402
from training.fl.pipeline_state import Workspace  # noqa: E402

TOPK = {"filter": "partial_sharing", "fraction": 0.4, "strategy": "topk"}
RANDOM = {"filter": "partial_sharing", "fraction": 0.4, "strategy": "random"}
CLIP = {"filter": "percentile_clipping", "percentile": 90}
GAUSS = {"filter": "gaussian_noise", "noise_multiplier": 1.0, "clip_norm": 1.0}
LAPLACE = {"filter": "laplace_noise", "epsilon": 1.0, "sensitivity": 1.0}
SVT1 = {"filter": "svt", "epsilon": 1.0, "threshold": 0.5, "fraction": 0.1, "max_passes": 1}
SVT3 = {"filter": "svt", "epsilon": 1.0, "threshold": 5.0, "fraction": 0.1, "max_passes": 3}

CASES = [
    ("no filter (flatten + views)", []),
    ("partial_sharing topk 0.4", [TOPK]),
    ("partial_sharing random 0.4", [RANDOM]),
    ("percentile_clipping p90 (all shared)", [CLIP]),
    ("gaussian_noise (all shared)", [GAUSS]),
    ("laplace_noise (all shared)", [LAPLACE]),
    ("svt fraction 0.1, 1 pass", [SVT1]),
    ("svt threshold 5 (nothing passes), 3 passes", [SVT3]),
    ("TARGET: topk 0.4 + percentile + gaussian", [TOPK, CLIP, GAUSS]),
    ("topk 0.4 + percentile + laplace", [TOPK, CLIP, LAPLACE]),
]


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", default="", help="run only the pipelines whose label has this")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    delta = {
        "layer.weight": torch.randn(args.params - 1000, generator=g),
        "layer.bias": torch.randn(1000, generator=g),
    }
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {args.params:,} float32 parameters"
    )
    agg = StreamingFedAvg(delta)
    ws = Workspace()
    baseline = "one aggregation pass (baseline)"
    cases = [(baseline, lambda: agg.add(delta, None, 3.0))]
    cases += [
        (label, lambda p=pipeline: apply_pipeline(delta, p, generator=g, workspace=ws))
        for label, pipeline in CASES
        if not args.only or args.only in label
    ]
    times = best_interleaved(cases, args.repeats)
    one_pass = times[baseline]
    print(f"{'pipeline':45s} {'ms':>9s} {'passes':>8s}")
    for label, seconds in times.items():
        print(f"{label:45s} {seconds * 1e3:9.2f} {seconds / one_pass:8.1f}")


if __name__ == "__main__":
    main()
