#!/usr/bin/env python
"""The sampled Shapley estimators on real federated training, against exact Shapley (issue 15).

    .venv/bin/python benchmarks/science/shapley_on_training.py [--quick] [--sites 6 8 9 10 12]
        [--seeds K] [--rounds R] [--values metric loss]

``shapley_estimator.py`` measures the estimators on pure Python games, where the target (an
error of at most 0.05 of the total at a third of the evaluations) is met from 8 sites on. This
script measures them where the platform uses them: on the coalition values of a real FedAvg
round. The sites are ``contribution_worth.py``'s five of known worth (two identical, a plain one,
the small sole holder of class 9, one with noisy labels) plus ``n - 5`` plain sites of 150
records each (classes 0 to 8, drawn apart from the others); each round every coalition is valued
as the coordinator values it (:class:`training.fl.coalition.CoalitionUtility` over the round's
updates, by validation accuracy or by minus the validation loss), and scored by exact Shapley
(2^n coalitions), estimator 1 (the permutation walk), estimator 2 (the paired kernel estimator)
and estimator 3 (estimator 2 with the coordinator's surrogate as a control variate, made by the
same call the coordinator makes, ``CoalitionUtility.surrogate``), at the platform's defaults
with the metric's resolution.

Printed per n and value, over the seeds: each estimator's error on the scores summed over the
rounds (what ``contribution.job_scored`` reports), Σ_i |φ̂_i − φ_i| / |v(N) − v(∅)| with the
totals summed too (mean and worst), the median of the per-round errors over the rounds whose
value moved beyond the estimator's threshold, the evaluations per round as a share of 2^n
(cost), and the compute as a share of exact Shapley's: the evaluations' share plus, for
estimator 3, the surrogate's time over the time of evaluating all 2^n coalitions in the same
round (median round; on this small MLP one evaluation is cheap, so the surrogate weighs more
than it would for a larger model). Exact Shapley is the reference, so it runs here beyond the
product's limit of 8 sites, up to 12 (:data:`REFERENCE_MAX_PLAYERS`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

import contribution_worth as worth  # noqa: E402

from training.fl import contribution as C  # noqa: E402
from training.fl.coalition import CoalitionUtility  # noqa: E402

ESTIMATORS = {
    "estimator 1": C.ESTIMATOR_PERMUTATIONS,
    "estimator 2": C.ESTIMATOR_PAIRED,
    "estimator 3": C.ESTIMATOR_CONTROL_VARIATE,
}
PLAIN_RECORDS = 150
#: Exact Shapley is the reference here, so it runs beyond the product's limit (8): at 12 sites a
#: round is 4,096 coalition models, a few seconds on this small MLP.
REFERENCE_MAX_PLAYERS = 12
#: The five sites of known worth (kept before :func:`measure` lends the loop other sites).
FIVE_SITES = worth.known_worth_sites


def sites_for(n: int):
    """``contribution_worth``'s five sites plus ``n - 5`` plain ones, for one seed."""

    def build(seed: int, noise: float = worth.DEFAULT_NOISE):
        sites = FIVE_SITES(seed, noise)
        pooled = worth.pool_site_data(worth.demo_split("digits", worth.DEMO_SITES, seed=0))
        x, y = pooled.x_train, pooled.y_train
        g = torch.Generator().manual_seed(seed + 991)
        common = torch.nonzero(y != worth.UNIQUE_CLASS).flatten()
        common = common[torch.randperm(len(common), generator=g)]
        for k in range(n - len(sites)):
            idx = common[k * PLAIN_RECORDS : (k + 1) * PLAIN_RECORDS].sort().values
            sites[f"c{k}"] = worth._site(x[idx], y[idx])
        return sites

    return build


def score_round(base_state, updates, validation, first, seed, value="metric") -> dict[str, Any]:
    """Exact Shapley and each estimator over one table of the round's coalition values."""
    x, y = validation
    utility = CoalitionUtility(
        base_state=base_state,
        updates=updates,
        model=worth._model(0, first),
        x=x,
        y=y,
        modality="tabular",
        combine="mean",
        value=value,
        loss=worth.CFG.loss,
    )
    v = worth._Memo(utility)
    players = list(updates)
    settings = dict(worth.CONTRIBUTION_DEFAULTS)
    args = {
        "permutations": settings["permutations"],
        "truncation": settings["truncation"],
        "tolerance": settings["tolerance"],
        "seed": seed,
        "resolution": utility.resolution,
    }
    results = {"exact": C.shapley_exact(players, v, max_players=REFERENCE_MAX_PLAYERS)}
    surrogate_seconds = time.perf_counter()
    surrogate = utility.surrogate()  # the coordinator's own call (training.rounds.contributions)
    surrogate_seconds = time.perf_counter() - surrogate_seconds
    for name, estimator in ESTIMATORS.items():
        extra = {"surrogate": surrogate} if estimator == C.ESTIMATOR_CONTROL_VARIATE else {}
        results[name] = C.compute(
            "shapley_sampled", players, v, **args, estimator=estimator, **extra
        )
    # One more pass over every coalition, timed on its own: what exact Shapley's 2^n real
    # evaluations cost, against which the surrogate's compute is put.
    started = time.perf_counter()
    for coalition in results["exact"].values:
        utility(coalition)
    exact_seconds = time.perf_counter() - started
    return {
        "v_full": v(frozenset(players)),
        "v_empty": v(frozenset()),
        "resolution": utility.resolution,
        "threshold": max(settings["truncation"], utility.resolution),
        "scores": {k: dict(r.scores) for k, r in results.items()},
        "evaluations": {k: r.evaluations for k, r in results.items()},
        "surrogate_share": surrogate_seconds / exact_seconds,
        "params": {},
    }


def measure(n: int, seeds: Sequence[int], rounds: int, value: str) -> dict[str, Any]:
    """Train and score ``n`` sites for each seed; the estimators' errors and costs."""
    # contribution_worth's training loop, with these sites and this scoring.
    worth_sites, worth_score, worth_methods = (
        worth.known_worth_sites,
        worth.score_round,
        worth.METHODS,
    )
    build = sites_for(n)
    worth.known_worth_sites, worth.score_round = build, score_round
    worth.METHODS = tuple((k, k) for k in ("exact", *ESTIMATORS))
    try:
        runs = [worth.run_seed(seed, rounds, worth.DEFAULT_NOISE, [value]) for seed in seeds]
    finally:
        worth.known_worth_sites, worth.score_round, worth.METHODS = (
            worth_sites,
            worth_score,
            worth_methods,
        )
    out: dict[str, Any] = {}
    shares = [rnd["surrogate_share"] for run in runs for rnd in run["by_value"][value]["rounds"]]
    for name in ESTIMATORS:
        summed, per_round, evaluations = [], [], []
        for run in runs:
            r = run["by_value"][value]
            summed.append(
                worth.normalised_error(r["totals"][name], r["totals"]["exact"], r["total"])
            )
            for rnd in r["rounds"]:
                total = rnd["v_full"] - rnd["v_empty"]
                if abs(total) > rnd["threshold"]:
                    per_round.append(
                        worth.normalised_error(rnd["scores"][name], rnd["scores"]["exact"], total)
                    )
                evaluations.append(rnd["evaluations"][name])
        out[name] = {
            "summed_mean": statistics.fmean(summed),
            "summed_max": max(summed),
            "per_round_median": statistics.median(per_round) if per_round else None,
            "rounds_moved": len(per_round),
            "cost": statistics.fmean(evaluations) / 2**n,
            # Compute against exact Shapley's 2^n evaluations: the real evaluations' share,
            # plus, for estimator 3, its surrogate's time over theirs (median round).
            "compute": statistics.fmean(evaluations) / 2**n
            + (statistics.median(shares) if estimator_uses_surrogate(name) else 0.0),
        }
    return out


def estimator_uses_surrogate(name: str) -> bool:
    return ESTIMATORS[name] == C.ESTIMATOR_CONTROL_VARIATE


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: 6 sites, 1 seed, 2 rounds")
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="n (default 6 8 10)")
    parser.add_argument("--seeds", type=int, default=None, help="how many seeds (default 10)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 10)")
    parser.add_argument("--values", nargs="+", choices=worth.VALUES, default=list(worth.VALUES))
    args = parser.parse_args(argv)
    args.sites = args.sites or ([6] if args.quick else [6, 8, 10])
    args.seeds = args.seeds or (1 if args.quick else 10)
    args.rounds = args.rounds or (2 if args.quick else 10)
    bad = [n for n in args.sites if not 6 <= n <= REFERENCE_MAX_PLAYERS]
    if bad:
        parser.error(f"--sites must be between 6 and {REFERENCE_MAX_PLAYERS} (exact Shapley)")
    return args


def main(argv: Sequence[str] | None = None, *, log=print) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    seeds = list(range(args.seeds))
    results: dict[str, Any] = {}
    log(
        f"seeds {seeds}, {args.rounds} rounds; error = Σ|φ̂−φ| / |v(N)−v(∅)| against exact "
        "Shapley; target: error <= 0.05 at cost <= 0.333"
    )
    log("| sites | value | estimator | error of the summed scores: mean (worst) "
        "| per-round error, median (rounds) | cost | compute |")  # fmt: skip
    log("|---|---|---|---|---|---|---|")
    for n in args.sites:
        for value in args.values:
            found = measure(n, seeds, args.rounds, value)
            results[f"{n}/{value}"] = found
            for name, f in found.items():
                median = "-" if f["per_round_median"] is None else f"{f['per_round_median']:.3f}"
                log(
                    f"| {n} | {value} | {name} | {f['summed_mean']:.3f} ({f['summed_max']:.3f}) "
                    f"| {median} ({f['rounds_moved']}) | {f['cost']:.2f} | {f['compute']:.2f} |"
                )
    log(f"\nrun time {time.perf_counter() - started:.0f} s")
    return results


if __name__ == "__main__":
    main()
