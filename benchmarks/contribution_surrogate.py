#!/usr/bin/env python
"""What contribution estimator 3's surrogate costs, against evaluating every coalition.

    .venv/bin/python benchmarks/contribution_surrogate.py [--sites 8 12] [--models mlp cnn]
        [--records 500] [--sample 16]

Estimator 3 (``training.fl.contribution``) evaluates the same third of the coalitions as
estimator 2 and adds a surrogate of all 2^n (``training/fl/coalition_surrogate.py``): first and
second directional derivatives of the validation logits along the sites' updates, then a
contraction per coalition. This prints, per model and number of sites, the surrogate's wall time
(``CoalitionUtility.surrogate``, after one warm-up call: the coordinator's process is long-lived)
over the wall time of evaluating all 2^n coalition models (``CoalitionUtility.__call__``,
timed on every ``--sample``-th coalition and scaled up), both in this run, on one torch
thread, and the memory the surrogate added to the process's peak (``ru_maxrss``; each
measurement runs in a fresh process).

The models are the registry's: ``mlp`` (hidden 64, 32) on 30 features (breast cancer's shape),
``cnn`` (channels 16, 32) on 1 x 28 x 28 images; ``--records`` validation records of random
data (the cost does not depend on the values), random updates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.fl.coalition import CoalitionUtility  # noqa: E402
from training.fl.models import MLP, SmallCNN  # noqa: E402

SHAPES = {"mlp": (MLP, [30], 2), "cnn": (SmallCNN, [1, 28, 28], 10)}


def utility_for(model_name: str, sites: int, records: int) -> CoalitionUtility:
    cls, shape, classes = SHAPES[model_name]
    torch.manual_seed(0)
    model = cls(input_shape=shape, n_classes=classes)
    base = {k: t.detach().clone() for k, t in model.state_dict().items()}
    updates = {
        f"site-{i:02d}": (
            {k: 0.01 * torch.randn_like(t) for k, t in base.items()},
            None,
            100.0 + i,
        )
        for i in range(sites)
    }
    return CoalitionUtility(
        base_state=base,
        updates=updates,
        model=model,
        x=torch.randn(records, *shape),
        y=torch.randint(0, classes, (records,)),
        modality="image" if model_name == "cnn" else "tabular",
    )


def measure(model_name: str, sites: int, records: int, sample: int) -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(model_name, sites, records, sample)
    finally:
        torch.set_num_threads(threads)


def _measure(model_name: str, sites: int, records: int, sample: int) -> dict[str, float]:
    utility = utility_for(model_name, sites, records)
    players = list(utility.sites)
    utility_for(model_name, 2, 8).surrogate()  # warm-up: torch.func's first call
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    surrogate = utility.surrogate()
    surrogate_seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert surrogate is not None and len(surrogate) == 2**sites
    started = time.perf_counter()
    timed = 0
    for mask in range(0, 2**sites, sample):
        utility(frozenset(p for j, p in enumerate(players) if mask >> j & 1))
        timed += 1
    exact_seconds = (time.perf_counter() - started) * 2**sites / timed
    return {
        "surrogate_s": surrogate_seconds,
        "exact_s": exact_seconds,
        "ratio": surrogate_seconds / exact_seconds,
        "memory_mib": max(0, peak - before) / 1024,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[8, 12])
    parser.add_argument("--models", nargs="+", choices=sorted(SHAPES), default=["mlp", "cnn"])
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--sample", type=int, default=16, help="time every k-th coalition")
    args = parser.parse_args(argv)
    if any(not 2 <= n <= 12 for n in args.sites):
        parser.error("--sites must be between 2 and 12 (the surrogate's limit)")
    print(
        f"{args.records} validation records, one torch thread; ratio = surrogate / evaluating "
        "all 2^n coalitions (same run)"
    )
    print("| model | sites | surrogate (s) | all 2^n coalitions (s) | ratio | memory added (MiB) |")
    print("|---|---|---|---|---|---|")
    # Each measurement in a fresh process, so that its peak memory is its own.
    spawn = multiprocessing.get_context("spawn")
    for model_name in args.models:
        for n in args.sites:
            with spawn.Pool(1) as pool:
                f = pool.apply(measure, (model_name, n, args.records, args.sample))
            print(
                f"| {model_name} | {n} | {f['surrogate_s']:.2f} | {f['exact_s']:.2f} "
                f"| {f['ratio']:.3f} | {f['memory_mib']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
