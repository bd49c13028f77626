#!/usr/bin/env python
"""Privacy filter benchmark: each filter's cost on a 10-million-parameter update.

    .venv/bin/python benchmarks/privacy.py [--params N] [--repeats R]

Every figure is a multiple of ONE AGGREGATION PASS over the same update, measured in the same run:
``StreamingFedAvg.add(delta, None, weight)`` on a warm accumulator (best of R). The update is one
layer of N float32 values plus a small bias, drawn from N(0, 1). Each pipeline runs on a reused
``Workspace`` (as a site worker does across rounds), best of R after one warm-up.

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
from training.fl.filters import Workspace, apply_pipeline  # noqa: E402

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


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=5)
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
    one_pass = best(lambda: agg.add(delta, None, 3.0), args.repeats)
    print(f"baseline: one aggregation pass = {one_pass * 1e3:.2f} ms")
    print(f"{'pipeline':45s} {'ms':>9s} {'passes':>8s}")
    ws = Workspace()
    for label, pipeline in CASES:
        seconds = best(
            lambda p=pipeline: apply_pipeline(delta, p, generator=g, workspace=ws), args.repeats
        )
        print(f"{label:45s} {seconds * 1e3:9.2f} {seconds / one_pass:8.1f}")


if __name__ == "__main__":
    main()
