#!/usr/bin/env python
"""The sampled Shapley estimators' error and cost against exact Shapley values (issue 15).

    .venv/bin/python benchmarks/science/shapley_estimator.py [--quick] [--seeds K] [--n 6 8 10]

For each utility family, number of sites n and seed, the exact Shapley values (all 2^n
coalitions) are computed, then the sampled method at the platform's defaults with estimator 1
(the GTG-Shapley permutation walk every entry before issue 15 used) and estimator 2 (the paired
kernel estimator, :mod:`training.fl.contribution`). Printed per family and n, mean ± standard
deviation (and the worst) over the seeds:

* ``err``: the normalised error Σ_i |φ̂_i − φ_i| / |v(N) − v(∅)|, "of the total" as issue 15
  means it (for a game whose sites all help it is also the L1 error over the L1 norm of the
  exact values; where a site hurts, as the noisy one does, it is the stricter of the two);
* ``cost``: the coalitions evaluated as a share of exact Shapley's 2^n.

Target: err at most 0.05 at cost at most 1/3. The families are pure Python games (no training):

* ``known_worth``: an FL-like accuracy (0.1 + per-class saturating coverage, rounded to one
  record of a 300-record validation set) over sites holding classes: s00 and s01 identical,
  s02 small and the only one holding class 9, s03 with noisy labels (it covers half as well
  and costs accuracy, most in small coalitions), the rest random;
* ``concave``: sqrt of a weighted sum (diminishing returns); ``coverage``: the weight of the
  items a coalition covers (monotone submodular); ``additive_noise``: additive plus Gaussian
  noise of 1% of the total on every coalition; ``duplicates``: 1 - exp(-weight of the distinct
  groups present), s00/s01 and s02/s03 copies;
* ``arbitrary``: every coalition value drawn uniformly (no structure): a stress case that no
  estimator reading a third of the coalitions can meet; shown so that nobody mistakes the
  target for a guarantee.
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from training.fl import contribution as C  # noqa: E402


def _names(n: int) -> list[str]:
    return [f"s{i:02d}" for i in range(n)]


def known_worth(n: int, seed: int, records: int = 300):
    rng = random.Random(seed)
    classes = 10
    names = _names(n)
    holds = {
        p: [rng.uniform(0.2, 1.0) * rng.choice([0.0, 1.0, 1.0]) for _ in range(classes)]
        for p in names
    }
    for p in names:
        holds[p][9] = 0.0
    holds[names[1]] = list(holds[names[0]])
    holds[names[2]] = [0.0] * 9 + [0.3]
    noisy = names[3]

    def v(coalition):
        acc = 0.1
        for c in range(classes):
            q = sum(holds[p][c] for p in sorted(coalition) if p != noisy)
            q += 0.5 * holds[noisy][c] if noisy in coalition else 0.0
            acc += 0.09 * (1 - math.exp(-2.5 * q))
        if noisy in coalition:
            acc -= 0.04 / len(coalition)
        return round(acc * records) / records

    return names, v, 1 / records


def concave(n: int, seed: int):
    rng = random.Random(seed)
    names = _names(n)
    w = {p: rng.uniform(0, 1) * rng.choice([1, 1, 3]) for p in names}
    return names, lambda s: math.sqrt(sum(w[p] for p in sorted(s))), 0.0


def coverage(n: int, seed: int):
    rng = random.Random(seed)
    names = _names(n)
    weight = [rng.uniform(0.5, 1) for _ in range(40)]
    covers = {p: {j for j in range(40) if rng.random() < rng.uniform(0.05, 0.4)} for p in names}

    def v(coalition):
        items = set().union(*(covers[p] for p in coalition)) if coalition else set()
        return sum(weight[j] for j in sorted(items))

    return names, v, 0.0


def additive_noise(n: int, seed: int, sigma: float = 0.01):
    rng = random.Random(seed)
    names = _names(n)
    w = {p: rng.uniform(0, 1) for p in names}
    total = sum(w.values())

    def v(coalition):
        if not coalition:
            return 0.0
        noise = random.Random(f"{seed}:{sorted(coalition)}").gauss(0, sigma * total)
        return sum(w[p] for p in sorted(coalition)) + noise

    return names, v, 0.0


def duplicates(n: int, seed: int):
    rng = random.Random(seed)
    names = _names(n)
    group = {p: (i // 2 if i < 4 else i) for i, p in enumerate(names)}
    w: dict[int, float] = {}
    for p in names:
        w.setdefault(group[p], rng.uniform(0.2, 1))
    return (
        names,
        lambda s: 1 - math.exp(-sum(w[g] for g in sorted({group[p] for p in s}))),
        0.0,
    )


def arbitrary(n: int, seed: int):
    rng = random.Random(seed)
    names = _names(n)
    values = {frozenset(): 0.0}
    for k in range(1, n + 1):
        for c in itertools.combinations(names, k):
            values[frozenset(c)] = rng.uniform(-1, 2)
    return names, lambda s: values[frozenset(s)], 0.0


FAMILIES = {
    "known_worth": known_worth,
    "concave": concave,
    "coverage": coverage,
    "additive_noise": additive_noise,
    "duplicates": duplicates,
    "arbitrary": arbitrary,
}


def measure(family: str, n: int, seed: int, estimator: int) -> tuple[float, float]:
    """``(normalised error, evaluations / 2^n)`` of one run at the platform's defaults."""
    names, v, resolution = FAMILIES[family](n, seed)
    exact = C.shapley_exact(names, v, max_players=n).scores
    total = v(frozenset(names)) - v(frozenset())
    got = C.compute(
        "shapley_sampled", names, v, seed=seed, estimator=estimator, resolution=resolution
    )
    error = sum(abs(got.scores[p] - exact[p]) for p in names) / abs(total)
    return error, got.evaluations / 2**n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 seeds (what CI runs)")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--n", type=int, nargs="+", default=[6, 8, 10])
    args = parser.parse_args(argv)
    seeds = range(3 if args.quick else args.seeds)
    print(f"seeds {list(seeds)}; err = Σ|φ̂-φ| / |v(N)-v(∅)|; cost = evaluations / 2^n")
    print("target: err <= 0.05 at cost <= 0.333")
    print(f"{'family':15s} {'n':>3s}  {'estimator 1 (walk)':>34s}  {'estimator 2 (paired)':>34s}")
    for family in FAMILIES:
        for n in args.n:
            cells = []
            for estimator in (C.ESTIMATOR_PERMUTATIONS, C.ESTIMATOR_PAIRED):
                runs = [measure(family, n, s, estimator) for s in seeds]
                errs = [e for e, _c in runs]
                costs = [c for _e, c in runs]
                cells.append(
                    f"err {statistics.mean(errs):6.3f}±{statistics.pstdev(errs):.3f} "
                    f"max {max(errs):6.3f} cost {statistics.mean(costs):.2f}"
                )
            print(f"{family:15s} {n:3d}  {cells[0]:>34s}  {cells[1]:>34s}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
